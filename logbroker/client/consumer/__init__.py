"""The consumer (logbroker/client/consumer/consumer.py says how its parts fit together).

The names the single-module consumer exported stay importable from here.
"""

from logbroker.client.consumer.commits import ASYNC_COMMITS_MAX, CommitCallback
from logbroker.client.consumer.commits import AsyncCommit as _AsyncCommit
from logbroker.client.consumer.consumer import Consumer
from logbroker.client.consumer.fetcher import (
    FETCHES_IN_FLIGHT_PER_BROKER,
    STREAM_FETCH_RESPONSE_BYTES_MAX,
    TAIL_RESPONSE_BYTES_MAX,
)
from logbroker.client.consumer.fetcher import Chunk as _Chunk
from logbroker.client.consumer.fetcher import FetchCall as _FetchCall
from logbroker.client.consumer.membership import LEAVE_WAIT_S_MAX, RebalanceCallback
from logbroker.client.consumer.subscription import EARLIEST, LATEST, TopicPartition, parse_reset
from logbroker.client.consumer.subscription import PartitionState as _PartitionState

__all__ = [
    "ASYNC_COMMITS_MAX", "EARLIEST", "FETCHES_IN_FLIGHT_PER_BROKER", "LATEST", "LEAVE_WAIT_S_MAX",
    "STREAM_FETCH_RESPONSE_BYTES_MAX", "TAIL_RESPONSE_BYTES_MAX", "CommitCallback", "Consumer",
    "RebalanceCallback", "TopicPartition", "_AsyncCommit", "_Chunk", "_FetchCall", "_PartitionState",
    "parse_reset",
]

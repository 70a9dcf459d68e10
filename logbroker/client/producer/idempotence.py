"""The idempotent producer's side (Kafka's TransactionManager, idempotence only): its producer id and
epoch, and the next sequence number of each partition.

    no id ──InitProducerId (lazily, before the first batch is encoded)──> (id, epoch), sequences 0
      │                                                                        │
      └──────────── reset(): a sequenced batch failed for good (its records may or may not be in
                    the log, so the partition's next sequence is unknown) ─────┘ next batch: a new id

A batch gets its sequence when it is encoded (`Sender._send_request`, once): its payload, header
included, is kept for retries, so a retried batch keeps its sequence and the leader answers a
retry whose first try landed with the original offsets. At most one request per partition is on
the wire (the accumulator mutes the partition), so sequences reach a partition in order.

A reset takes a new producer id rather than bumping the epoch (KIP-360): batches already encoded
under the old id keep it (the partitions still know it), and everything encoded afterwards starts at
sequence 0 under the new one, which the partitions accept as an unknown producer. With a
`producer_name`, a reset asks for the name's id again, which bumps its epoch.

A broker without InitProducerId (UNIMPLEMENTED) turns idempotence off for the producer's life, with
one warning: its batches go out with producerId -1, as before this feature.

Thread safety: `sequenced` runs under the sender's ship lock (one shipping thread at a time);
`reset` under the accumulator's lock; the fields they share are simple assignments.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from logbroker.client.call_errors import is_retriable, rpc_error
from logbroker.errors import (
    BrokerUnavailableError,
    InvalidProducerEpochError,
    LogbrokerError,
    UnknownServerError,
    error_for,
)
from logbroker.retry import RetryPolicy
from logbroker.storage.producer_state import sequence_after
from logbroker.v1 import logbroker_pb2 as pb

if TYPE_CHECKING:
    from logbroker.client.metadata_cache import MetadataCache

log = logging.getLogger(__name__)

Caller = Callable[[pb.InitProducerIdRequest, float], pb.InitProducerIdResponse]  # (request, timeout_s) -> response


class ProducerIdentity:
    """See the module doc. `call` sends InitProducerId to some broker (raising grpc.RpcError)."""

    def __init__(self, call: Caller, producer_name: str, retry_policy: RetryPolicy, timeout_s: float) -> None:
        self._call = call
        self._name = producer_name
        self._retry_policy = retry_policy
        self._timeout_s = timeout_s
        self.producer_id = -1
        self.epoch = -1
        self._sequences: dict[tuple[str, int], int] = {}
        self.fenced: InvalidProducerEpochError | None = None
        self.unsupported = False  # a broker without InitProducerId (older than idempotence): plain batches

    def sequenced(self, topic: str, partition: int, record_count: int) -> tuple[int, int, int]:
        """(producer id, epoch, base sequence) for a batch about to be encoded; gets an id first if
        there is none (blocking, retried up to the timeout: then a retriable BrokerUnavailableError,
        so the batch backs off and tries again). A fenced producer raises its fencing error."""
        if self.fenced is not None:
            raise self.fenced
        if self.producer_id < 0:
            if self.unsupported:
                return -1, -1, -1
            self._init()
            if self.unsupported:
                return -1, -1, -1
        key = (topic, partition)
        seq = self._sequences.get(key, 0)
        self._sequences[key] = sequence_after(seq, record_count)
        return self.producer_id, self.epoch, seq

    def batch_failed(self, err: BaseException) -> None:
        """A sequenced batch failed for good: fenced (a newer producer has our name: every later batch
        fails too) or reset (module doc)."""
        if isinstance(err, InvalidProducerEpochError):
            self.fenced = err
        else:
            self.reset()

    def take_back(self, topic: str, partition: int, batches: list[tuple[int, int, int]]) -> bool:
        """A partition refused these sequenced batches, (producer id, base sequence, record count) in
        order, and the producer sends their records again (reroute.py). When they are the partition's
        last sequences under the current id, back to back, its next batch takes the first one's
        sequence again (True); otherwise the producer starts over under a new id (`reset`)."""
        key = (topic, partition)
        expected = batches[0][1]
        ok = self.producer_id >= 0
        for producer_id, base, count in batches:
            if not ok or producer_id != self.producer_id or base != expected:
                ok = False
                break
            expected = sequence_after(base, count)
        if ok and self._sequences.get(key) == expected:
            self._sequences[key] = batches[0][1]
            return True
        self.reset()
        return False

    def reset(self) -> None:
        """Forget the id: the next batch is encoded under a new one (module doc)."""
        self.producer_id = -1
        self._sequences = {}

    def _init(self) -> None:
        deadline = time.monotonic() + self._timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._call(pb.InitProducerIdRequest(producer_name=self._name), self._timeout_s)
                if resp.error_code == pb.NONE:
                    self.producer_id, self.epoch = resp.producer_id, resp.producer_epoch
                    self._sequences = {}
                    return
                err: LogbrokerError = error_for(resp.error_code, resp.error_message)
            except grpc.RpcError as e:
                if hasattr(e, "code") and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("the brokers do not support idempotent producing (no InitProducerId): "
                                "this producer sends plain batches")
                    self.unsupported = True
                    return
                err = rpc_error(e)
            retriable = is_retriable(err) or isinstance(err, BrokerUnavailableError | UnknownServerError)
            wait_ms = self._retry_policy.delay_ms(attempt)
            if not retriable:
                raise err
            if wait_ms is None or time.monotonic() + wait_ms / 1000 >= deadline:
                raise BrokerUnavailableError(f"no producer id within {self._timeout_s:.1f} s: {err}") from err
            time.sleep(wait_ms / 1000)


def init_producer_id(metadata: MetadataCache, request: pb.InitProducerIdRequest,
                     timeout_s: float) -> pb.InitProducerIdResponse:
    """InitProducerId at the first known broker that answers (grpc.RpcError from the last if none)."""
    last: grpc.RpcError | None = None
    for address in metadata.candidate_addresses():
        try:
            return metadata.broker_stub(address).InitProducerId(request, timeout=timeout_s)
        except grpc.RpcError as e:
            last = e
    assert last is not None
    raise last

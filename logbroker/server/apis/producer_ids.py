"""InitProducerId: idempotent producers' ids and epochs.

Anonymous producers get ids from a block this broker took from the metadata store
(cluster/producer_id_store.py: PRODUCER_ID_BLOCK_SIZE ids per store write, so ids are unique
across the cluster and a restarted broker never reuses one: it takes a new block). A named
producer's id and epoch are read and bumped in the store itself, so any broker answers the same
name consistently. Calls are serialized (an asyncio lock) and their store work runs in a thread.
Failures are data: the response's error_code (INVALID_REQUEST for a bad name; a store error as
UNKNOWN_SERVER_ERROR, which the client retries).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from logbroker.cluster.producer_id_store import ProducerIdStore
from logbroker.errors import BrokerError, UnknownServerError
from logbroker.server.request_context import RequestContext
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

PRODUCER_ID_BLOCK_SIZE = 1000


class ProducerIdApis:
    def __init__(self, store: Callable[[], ProducerIdStore], block_size: int = PRODUCER_ID_BLOCK_SIZE) -> None:
        self._store = store
        self._block_size = block_size
        self._next = 0
        self._end = 0  # [next, end): ids of this broker's current block not yet handed out
        self._lock = asyncio.Lock()

    def _new_id(self) -> int:
        """The next id of this broker's block, taking a new block when it is used up (blocks)."""
        if self._next >= self._end:
            start = self._store().allocate_block(self._block_size)
            self._next, self._end = start, start + self._block_size
        pid = self._next
        self._next += 1
        return pid

    def _init(self, name: str) -> tuple[int, int]:
        if not name:
            return self._new_id(), 0
        return self._store().bump_named(name, self._new_id)

    async def init_producer_id(self, context: RequestContext, req: pb.InitProducerIdRequest) -> pb.InitProducerIdResponse:
        try:
            async with self._lock:
                pid, epoch = await asyncio.to_thread(self._init, req.producer_name)
        except BrokerError as e:
            return pb.InitProducerIdResponse(error_code=e.code, error_message=e.message, producer_id=-1,  # type: ignore[arg-type]
                                             producer_epoch=-1)
        except Exception as e:  # the store (ZooKeeper) failed: the client retries
            log.warning("InitProducerId for %s failed: %s", context.peer, e)
            err = UnknownServerError(f"producer id store: {e}")
            return pb.InitProducerIdResponse(error_code=err.code, error_message=err.message, producer_id=-1,
                                             producer_epoch=-1)
        return pb.InitProducerIdResponse(producer_id=pid, producer_epoch=epoch)

"""The split point of a topic grown in a cluster (cluster/lineage.py): each old partition's split offset.

The broker that grows a topic writes the split pending, with the new assignment; the controller's
UpdateMetadata then tells every broker the new count, and a leader refuses the keys that hash
elsewhere from then on. This asks each old partition's leader for its log end offset with
ListOffsets `split_partitions` = the new count: a leader answers only once it checks keys against
that count (OFFSET_NOT_AVAILABLE before), and reads its log end offset in the same event-loop step
as that check, so no record of a moved key lands at or after the offset it answers. Once every old
partition has answered, the caller writes the split complete (ZkStore.complete_split).

Limit: a leader that changes after answering keeps the offset its predecessor gave; a new leader
that had not yet received the new count when it took over could accept a moved key above it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from logbroker.cluster.metadata_image import MetadataImage
from logbroker.retry import RetryPolicy
from logbroker.server.broker_channels import BrokerChannels
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

SPLIT_POINT_RETRY = RetryPolicy(initial_ms=50, max_ms=500, jitter=0.2)
SPLIT_POINT_CALL_TIMEOUT_S = 5.0


async def read_split_offsets(image: MetadataImage, channels: BrokerChannels, topic: str, old: int, new: int,
                             timeout_s: float) -> list[int] | None:
    """Every old partition's split offset, in partition order; None if some leader has not answered
    within `timeout_s` (the split stays pending and readers keep holding the children)."""
    deadline = time.monotonic() + timeout_s
    found: dict[int, int] = {}
    failures = 0
    while True:
        await _ask_leaders(image, channels, topic, [p for p in range(old) if p not in found], new, found)
        if len(found) == old:
            return [found[p] for p in range(old)]
        if time.monotonic() > deadline:
            log.warning("split of %s to %d partitions: no split offset yet from partitions %s", topic, new,
                        sorted(set(range(old)) - set(found)))
            return None
        failures += 1
        await asyncio.sleep((SPLIT_POINT_RETRY.delay_ms(failures) or 0) / 1000)


async def _ask_leaders(image: MetadataImage, channels: BrokerChannels, topic: str, partitions: list[int], new: int,
                       found: dict[int, int]) -> None:
    """One ListOffsets round to the leaders (as this broker's metadata names them) of `partitions`."""
    by_leader: dict[int, list[int]] = {}
    states = image.partitions.get(topic, {})
    for p in partitions:
        st = states.get(p)
        if st is not None and st.leader >= 0:
            by_leader.setdefault(st.leader, []).append(p)
    calls = []
    for leader, parts in sorted(by_leader.items()):
        address = image.broker_address(leader)
        if address is None:
            continue
        req = pb.ListOffsetsRequest(partitions=[
            pb.ListOffsetsPartition(topic=topic, partition=p, timestamp=-1, split_partitions=new) for p in parts])
        calls.append(channels.broker_stub(address).ListOffsets(req, timeout=SPLIT_POINT_CALL_TIMEOUT_S))
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, Exception):
                raise outcome
            continue  # an unreachable leader: asked again next round
        for r in outcome.results:
            if r.error_code == pb.NONE and r.topic == topic and r.offset >= 0:
                found[r.partition] = r.offset

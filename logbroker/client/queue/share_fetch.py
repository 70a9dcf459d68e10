"""One partition of a ShareFetchResponse turned into the records this member acquired (pure).

The broker sends whole record batches; only the offsets inside the partition's `acquired` ranges
are this member's, each with the range's delivery count. `read_partition` decodes the batches
(`record_batch.iter_batches` / `decode_batch`, CRC-checked, as the plain consumer does) and keeps
the records at acquired offsets. Acquired offsets with no record must still be settled, or the
broker would hold them until their lock expires:

    acquired offset o, no record at o, and o <= the last offset of the last complete batch
        -> GAP (compaction removed it, or a control batch sits there): settled like ACCEPT
    acquired offset o above the last complete batch (the response was cut short)
        -> RELEASE with delay 0: handed out again later, nothing lost
    `records` empty: every acquired offset is a GAP (nothing exists there any more)
    a batch that fails its CRC or does not decode: its acquired offsets -> RELEASE, and the error is
        returned (the broker's delivery count and max_delivery_attempts dead-letter it eventually)
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

from logbroker.client.queue.acks import GAP, RELEASE, Ack, ShareAck
from logbroker.errors import LogbrokerError
from logbroker.storage.record_batch import Message, decode_batch, iter_batches
from logbroker.v1 import logbroker_pb2 as pb

_OFFSET_MAX = 2**63 - 1


class Acquired(NamedTuple):
    """One record this member holds, and how often it has been delivered (1: the first time)."""

    record: Message
    delivery_count: int


class PartitionRead(NamedTuple):
    acquired: list[Acquired]  # in offset order
    acks: list[ShareAck]  # GAP / RELEASE runs for acquired offsets with no record handed out
    error: LogbrokerError | None  # a batch that did not decode (its offsets are released)


def read_partition(part: pb.ShareFetchPartition) -> PartitionRead:
    topic, partition = part.topic, part.partition
    ranges = sorted((r.first_offset, r.last_offset, r.delivery_count) for r in part.acquired
                    if r.last_offset >= r.first_offset >= 0)
    if not ranges:
        return PartitionRead([], [], None)
    starts = [r[0] for r in ranges]
    data = part.records
    out: list[Acquired] = []
    released: list[tuple[int, int]] = []  # offset spans of batches that did not decode
    covered_to = -1 if data else ranges[-1][1]  # the last offset the batches account for
    error: LogbrokerError | None = None
    try:
        batches = list(iter_batches(data))
    except LogbrokerError as e:
        batches, error = [], e
    for h, pos in batches:
        covered_to = max(covered_to, h.last_offset)
        if not _overlaps(ranges, starts, h.base_offset, h.last_offset):
            continue
        try:
            records = decode_batch(data, pos, h, topic, partition, ranges[0][0])
        except LogbrokerError as e:
            error = e
            released.append((h.base_offset, h.last_offset))
            continue
        _keep_acquired(records, ranges, out)
    return PartitionRead(out, _unsettled(topic, partition, ranges, out, covered_to, released), error)


def _keep_acquired(records: list[Message], ranges: list[tuple[int, int, int]], out: list[Acquired]) -> None:
    """Append the records inside `ranges` with their delivery counts: records and ranges both in
    offset order, walked side by side (no search per record)."""
    if not records:
        return
    if len(ranges) == 1 and ranges[0][0] <= records[0].offset and records[-1].offset <= ranges[0][1]:
        count = max(ranges[0][2], 1)
        out += [Acquired(m, count) for m in records]  # the common case: one range holds the batch
        return
    i, n = 0, len(ranges)
    for m in records:
        offset = m.offset
        while i < n and ranges[i][1] < offset:
            i += 1
        if i == n:
            return
        first, _, count = ranges[i]
        if offset >= first:
            out.append(Acquired(m, count if count > 1 else 1))


def _overlaps(ranges: list[tuple[int, int, int]], starts: list[int], first: int, last: int) -> bool:
    i = bisect.bisect_right(starts, last) - 1
    return i >= 0 and ranges[i][1] >= first


def _delivery_count(ranges: list[tuple[int, int, int]], starts: list[int], offset: int) -> int | None:
    i = bisect.bisect_right(starts, offset) - 1
    if i >= 0 and ranges[i][0] <= offset <= ranges[i][1]:
        return max(ranges[i][2], 1)
    return None


def _unsettled(topic: str, partition: int, ranges: list[tuple[int, int, int]], got: list[Acquired],
               covered_to: int, released: list[tuple[int, int]]) -> list[ShareAck]:
    """GAP / RELEASE runs for the acquired offsets with no record in `got` (offset order)."""
    out: list[ShareAck] = []
    if not released and len(got) == sum(last - first + 1 for first, last, _ in ranges):
        return out  # every acquired offset has its record (the common case)
    have = {a.record.offset for a in got}
    bad = sorted(released)

    def kind(offset: int) -> Ack:
        i = bisect.bisect_right(bad, (offset, _OFFSET_MAX)) - 1
        if offset > covered_to or (i >= 0 and bad[i][0] <= offset <= bad[i][1]):
            return Ack(RELEASE)
        return Ack(GAP)

    for first, last, _ in ranges:
        run_start, run_ack = -1, Ack(GAP)
        # walk only the holes: the offsets of a range minus those handed out
        for offset in range(first, last + 1):
            if offset in have:
                if run_start >= 0:
                    out.append(ShareAck(topic, partition, run_start, offset - 1, run_ack))
                    run_start = -1
                continue
            ack = kind(offset)
            if run_start >= 0 and ack != run_ack:
                out.append(ShareAck(topic, partition, run_start, offset - 1, run_ack))
                run_start = -1
            if run_start < 0:
                run_start, run_ack = offset, ack
        if run_start >= 0:
            out.append(ShareAck(topic, partition, run_start, last, run_ack))
    return out

"""A share consumer's pending acknowledgements, per partition, coalesced into AcknowledgeRange runs.

Pure state: `PendingAcks.add(topic, partition, offset, ack)` records how one offset is settled;
`take()` removes everything pending and returns it as `ShareAck` runs, one per maximal run of
consecutive offsets of one partition with the same (type, delay_ms, reason), e.g.

    add 5 ACCEPT, 6 ACCEPT, 7 RELEASE(delay 0), 8 ACCEPT, 9 ACCEPT  ->  [5..6 ACCEPT] [7..7 RELEASE] [8..9 ACCEPT]

`put_back(runs)` returns taken runs (a call that never reached the broker) without overwriting an
offset settled again meanwhile. Bounded: at most `max_offsets` offsets pending; `add` beyond that
raises AckBufferFullError (the consumer sends its acknowledgements before that: `full`). An offset
already pending raises ValueError (a record is settled once).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from logbroker.errors import BrokerError, UnknownServerError, error_for
from logbroker.v1 import logbroker_pb2 as pb

ACCEPT = 1
RELEASE = 2
REJECT = 3
RENEW = 4
GAP = 5
ACK_TYPES = {ACCEPT: "accept", RELEASE: "release", REJECT: "reject", RENEW: "renew", GAP: "gap"}

PENDING_OFFSETS_MAX = 100_000
REASON_MAX_CHARS = 1024  # share_headers.REASON_TEXT_MAX_CHARS: the broker refuses longer


class Ack(NamedTuple):
    """How one offset is settled."""

    type: int
    delay_ms: int = 0
    reason: str = ""


ACCEPTED = Ack(ACCEPT)  # the common acknowledgement, built once (and known valid)


@dataclass(frozen=True)
class ShareAck:
    """One AcknowledgeRange of one partition: offsets first..last (inclusive) settled as `ack`."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    ack: Ack

    def offsets(self) -> range:
        return range(self.first_offset, self.last_offset + 1)


class AckBufferFullError(Exception):
    """More acknowledgements pending than the buffer holds: send them first."""


def check_ack(ack: Ack) -> None:
    """ValueError for an acknowledgement the broker would refuse (bad type, negative delay, long reason)."""
    if ack.type not in ACK_TYPES:
        raise ValueError(f"acknowledgement type must be one of {sorted(ACK_TYPES)}, not {ack.type}")
    if ack.delay_ms < 0:
        raise ValueError(f"delay_ms must be >= 0, got {ack.delay_ms}")
    if len(ack.reason) > REASON_MAX_CHARS:
        raise ValueError(f"reason must be at most {REASON_MAX_CHARS} characters, got {len(ack.reason)}")


class PendingAcks:
    """Acknowledgements not sent yet. Not thread-safe: the consumer holds its lock around it."""

    def __init__(self, max_offsets: int = PENDING_OFFSETS_MAX) -> None:
        if max_offsets < 1:
            raise ValueError(f"max_offsets must be >= 1, got {max_offsets}")
        self.max_offsets = max_offsets
        self._by_partition: dict[tuple[str, int], dict[int, Ack]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count >= self.max_offsets

    def add(self, topic: str, partition: int, offset: int, ack: Ack) -> None:
        if ack is not ACCEPTED:
            check_ack(ack)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        tp = (topic, partition)
        pending = self._by_partition.get(tp)
        if pending is None:
            pending = self._by_partition[tp] = {}
        elif offset in pending:
            raise ValueError(f"{topic}-{partition} offset {offset} is already settled")
        if self._count >= self.max_offsets:
            raise AckBufferFullError(f"{self._count} acknowledgements pending (at most {self.max_offsets})")
        pending[offset] = ack
        self._count += 1

    def add_run(self, run: ShareAck) -> None:
        """Every offset of `run` (e.g. GAPs), skipping offsets already pending."""
        pending = self._by_partition.setdefault((run.topic, run.partition), {})
        for offset in run.offsets():
            if offset not in pending and not self.full:
                pending[offset] = run.ack
                self._count += 1

    def take(self) -> list[ShareAck]:
        """Everything pending, coalesced, sorted by (topic, partition, offset); the buffer is then empty."""
        out: list[ShareAck] = []
        for (topic, partition), pending in sorted(self._by_partition.items()):
            out.extend(coalesce(topic, partition, pending))
        self._by_partition.clear()
        self._count = 0
        return out

    def put_back(self, runs: list[ShareAck]) -> None:
        """Return taken runs (their call failed); an offset pending again meanwhile keeps its new ack."""
        for run in runs:
            self.add_run(run)


def coalesce(topic: str, partition: int, pending: dict[int, Ack]) -> list[ShareAck]:
    """Maximal runs of consecutive offsets with equal acks."""
    out: list[ShareAck] = []
    first = last = -2
    current: Ack | None = None
    for offset in sorted(pending):
        ack = pending[offset]
        if current is not None and offset == last + 1 and ack == current:
            last = offset
            continue
        if current is not None:
            out.append(ShareAck(topic, partition, first, last, current))
        first = last = offset
        current = ack
    if current is not None:
        out.append(ShareAck(topic, partition, first, last, current))
    return out


def to_proto(runs: list[ShareAck]) -> list[pb.ShareAcknowledgement]:
    """The runs as ShareAcknowledgements, one per partition, ranges in offset order."""
    by_partition: dict[tuple[str, int], pb.ShareAcknowledgement] = {}
    for run in runs:
        msg = by_partition.get((run.topic, run.partition))
        if msg is None:
            msg = by_partition[(run.topic, run.partition)] = pb.ShareAcknowledgement(
                topic=run.topic, partition=run.partition)
        msg.ranges.add(first_offset=run.first_offset, last_offset=run.last_offset, type=run.ack.type,
                       delay_ms=run.ack.delay_ms, reason=run.ack.reason)
    return list(by_partition.values())


AckOutcome = dict[tuple[str, int, int], BrokerError | None]


def outcomes(runs: list[ShareAck], results: Iterable[pb.ShareAckResult]) -> AckOutcome:
    """Per offset of `runs`: None when the broker accepted it, else the error of its range (a range
    the broker did not answer for gets UnknownServerError)."""
    answered: dict[tuple[str, int, int, int], BrokerError | None] = {}
    for r in results:
        err = None if r.error_code == pb.NONE else error_for(r.error_code, r.error_message or
                                                             f"{r.topic}-{r.partition} {r.first_offset}..{r.last_offset}")
        answered[(r.topic, r.partition, r.first_offset, r.last_offset)] = err
    out: AckOutcome = {}
    for run in runs:
        key = (run.topic, run.partition, run.first_offset, run.last_offset)
        err = answered[key] if key in answered else UnknownServerError(
            f"no result for {run.topic}-{run.partition} {run.first_offset}..{run.last_offset}")
        for offset in run.offsets():
            out[(run.topic, run.partition, offset)] = err
    return out


def refused(results: Iterable[pb.ShareAckResult]) -> list[pb.ShareAckResult]:
    """The ranges the broker refused (cheap when it accepted everything: no per-offset work)."""
    return [r for r in results if r.error_code != pb.NONE]


def failed_outcomes(runs: list[ShareAck], err: BrokerError) -> AckOutcome:
    """Every offset of `runs` refused with `err` (a call refused as a whole)."""
    return {(run.topic, run.partition, o): err for run in runs for o in run.offsets()}

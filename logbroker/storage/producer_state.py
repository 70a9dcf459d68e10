"""Idempotent producers' state in one partition log (Kafka's ProducerStateManager), pure.

Per producer id the log keeps the producer's epoch and the metadata of its last
`BATCHES_KEPT` batches (first/last sequence, first/last offset) of that epoch, and the largest
batch timestamp seen (for expiry). The leader asks `check` before it appends a batch whose
producerId >= 0; every replica (leader, follower, and a log being loaded) calls `record` for
every such batch it appends, so the state is a function of the log's batch headers and survives
a failover and a restart.

`check(producer_id, epoch, base_sequence, record_count)` answers, in this order (as Kafka's
ProducerAppendInfo.checkSequence and findDuplicateBatch):

    unknown producer id                  -> APPEND (any sequence: it may have expired)
    epoch < the producer's epoch         -> FENCED (INVALID_PRODUCER_EPOCH)
    epoch > the producer's epoch         -> APPEND if base_sequence == 0, else OUT_OF_ORDER
    same epoch, a kept batch with the same first and last sequence
                                         -> DUPLICATE (that batch's first/last offset)
    same epoch, base_sequence == last sequence + 1 (int32 wrap: after 2**31-1 comes 0)
                                         -> APPEND
    otherwise                            -> OUT_OF_ORDER (OUT_OF_ORDER_SEQUENCE_NUMBER)

Sequences are int32 and wrap: a batch of n records starting at s ends at (s + n - 1) mod 2**31.

Expiry: `expire(now_ms)` drops producers whose largest batch timestamp is older than
`expiration_ms`. Bound: at most `producers_max` producer ids per partition; recording a new one
past the bound drops the least recently recorded one (a dict kept in recording order).

Truncation (`truncate_to(offset)`): batches at or past `offset` are forgotten; a producer left
without batches is forgotten (it is then unknown, so its next batch is accepted).
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

INT32_MAX = 2**31 - 1
NO_PRODUCER_ID = -1
BATCHES_KEPT = 5
PRODUCER_ID_EXPIRATION_MS_DEFAULT = 7 * 24 * 3600 * 1000  # Kafka's transactional.id.expiration.ms-like default
PRODUCERS_MAX_DEFAULT = 100_000


def sequence_after(sequence: int, increment: int) -> int:
    """`sequence + increment`, wrapping past INT32_MAX to 0 (Kafka's DefaultRecordBatch.incrementSequence)."""
    if sequence > INT32_MAX - increment:
        return increment - (INT32_MAX - sequence) - 1
    return sequence + increment


class Verdict(Enum):
    APPEND = "append"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    FENCED = "fenced"


class BatchMetadata(NamedTuple):
    first_sequence: int
    last_sequence: int
    first_offset: int
    last_offset: int


class CheckResult(NamedTuple):
    verdict: Verdict
    first_offset: int = -1  # DUPLICATE: the original batch's offsets
    last_offset: int = -1
    message: str = ""


_APPEND = CheckResult(Verdict.APPEND)


class ProducerEntry:
    """One producer's epoch and last batches, oldest first (all of `epoch`)."""

    __slots__ = ("batches", "epoch", "last_timestamp_ms")

    def __init__(self, epoch: int, last_timestamp_ms: int) -> None:
        self.epoch = epoch
        self.batches: list[BatchMetadata] = []
        self.last_timestamp_ms = last_timestamp_ms

    @property
    def last_sequence(self) -> int:
        return self.batches[-1].last_sequence if self.batches else -1


class ProducerStateMap:
    """The producer state of one partition log. See the module doc."""

    def __init__(
        self, expiration_ms: int = PRODUCER_ID_EXPIRATION_MS_DEFAULT, producers_max: int = PRODUCERS_MAX_DEFAULT
    ) -> None:
        if expiration_ms <= 0 or producers_max <= 0:
            raise ValueError("expiration_ms and producers_max must be positive")
        self.expiration_ms = expiration_ms
        self.producers_max = producers_max
        self._entries: dict[int, ProducerEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, producer_id: int) -> ProducerEntry | None:
        return self._entries.get(producer_id)

    def items(self) -> list[tuple[int, ProducerEntry]]:
        """(producer id, entry) in recording order, least recent first (a snapshot's order)."""
        return list(self._entries.items())

    def restore(self, producer_id: int, entry: ProducerEntry) -> None:
        """Put back a producer read from a snapshot, as the most recently recorded one (bounded as
        `record`)."""
        entries = self._entries
        entries.pop(producer_id, None)
        if len(entries) >= self.producers_max:
            del entries[next(iter(entries))]
        entries[producer_id] = entry

    def check(self, producer_id: int, epoch: int, base_sequence: int, record_count: int) -> CheckResult:
        """What the leader should do with this batch (module doc). Changes nothing."""
        entry = self._entries.get(producer_id)
        if entry is None:
            return _APPEND
        if epoch < entry.epoch:
            return CheckResult(
                Verdict.FENCED,
                message=f"producer {producer_id} epoch {epoch} is older than its current epoch {entry.epoch}: fenced")
        if epoch > entry.epoch:
            if base_sequence == 0:
                return _APPEND
            return CheckResult(
                Verdict.OUT_OF_ORDER,
                message=f"producer {producer_id} starts epoch {epoch} at sequence {base_sequence}, expected 0")
        last_sequence = sequence_after(base_sequence, record_count - 1)
        for batch in entry.batches:
            if batch.first_sequence == base_sequence and batch.last_sequence == last_sequence:
                return CheckResult(Verdict.DUPLICATE, batch.first_offset, batch.last_offset)
        current = entry.last_sequence
        if current == -1 or base_sequence == sequence_after(current, 1):
            return _APPEND
        return CheckResult(
            Verdict.OUT_OF_ORDER,
            message=f"producer {producer_id} epoch {epoch}: sequence {base_sequence} does not follow {current}"
            f" (expected {sequence_after(current, 1)})")

    def record(
        self, producer_id: int, epoch: int, base_sequence: int, record_count: int, first_offset: int,
        last_offset: int, timestamp_ms: int,
    ) -> None:
        """Remember an appended batch (leader, follower or load), without checking it."""
        entries = self._entries
        entry = entries.pop(producer_id, None)
        if entry is None:
            if len(entries) >= self.producers_max:
                del entries[next(iter(entries))]  # the least recently recorded
            entry = ProducerEntry(epoch, timestamp_ms)
        elif epoch != entry.epoch:
            entry.epoch = epoch
            entry.batches = []
        entries[producer_id] = entry  # (re)inserted last: the dict stays in recording order
        batches = entry.batches
        batches.append(BatchMetadata(
            base_sequence, sequence_after(base_sequence, record_count - 1), first_offset, last_offset))
        if len(batches) > BATCHES_KEPT:
            del batches[0]
        if timestamp_ms > entry.last_timestamp_ms:
            entry.last_timestamp_ms = timestamp_ms

    def expire(self, now_ms: int) -> int:
        """Drop producers idle (by batch timestamp) for `expiration_ms` or longer; returns how many."""
        cutoff = now_ms - self.expiration_ms
        gone = [pid for pid, e in self._entries.items() if e.last_timestamp_ms <= cutoff]
        for pid in gone:
            del self._entries[pid]
        return len(gone)

    def truncate_to(self, offset: int) -> None:
        """Forget batches at or past `offset` (the log was truncated there)."""
        for pid in list(self._entries):
            entry = self._entries[pid]
            kept = [b for b in entry.batches if b.last_offset < offset]
            if not kept:
                del self._entries[pid]
            else:
                entry.batches = kept

    def clear(self) -> None:
        self._entries.clear()

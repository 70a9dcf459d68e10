"""The leader epoch history of one log (Kafka's LeaderEpochFileCache): which leader epoch wrote
from which offset on, for OffsetForLeaderEpoch and follower truncation (KIP-101/279).

A history is a list of (leader epoch, start offset) entries, oldest first. It is persisted in the
log's index (index.py, the epoch records); this module only decides: a `LeaderEpochCache` is an
immutable value, and every change returns a new one, so the log writes the change to the index
(in the same transaction as the data it belongs to) before it adopts it, and a failed write leaves
the history as it was.

Invariants of a history:
- epochs strictly increase, and so do start offsets (an epoch that got no batch before the next
  one started is dropped by `assign`);
- after `truncate_from_start(s)`, no entry starts below `s` (the epoch spanning `s` starts at `s`);
- after `truncate_from_end(e)`, every entry starts below `e`.
The log keeps every entry's start offset in [log start offset, log end offset]; only the latest may
equal the log end offset (an epoch that leads but has not written yet: `Log.assign_epoch_start`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from logbroker.errors import CorruptMessageError
from logbroker.storage.index import EpochEntry

UNDEFINED_EPOCH = -1
UNDEFINED_EPOCH_OFFSET = -1


class LeaderEpochCache:
    """An immutable leader epoch history. See the module doc."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[EpochEntry] = ()) -> None:
        self._entries: list[EpochEntry] = list(entries)

    @property
    def entries(self) -> list[EpochEntry]:
        """(leader epoch, start offset), oldest first (a copy)."""
        return list(self._entries)

    @property
    def latest_epoch(self) -> int:
        return self._entries[-1][0] if self._entries else UNDEFINED_EPOCH

    @property
    def latest_start_offset(self) -> int:
        """Where the latest epoch starts (0 for an empty history)."""
        return self._entries[-1][1] if self._entries else 0

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LeaderEpochCache) and self._entries == other._entries

    def __hash__(self) -> int:
        return hash(tuple(self._entries))

    def __repr__(self) -> str:
        return f"LeaderEpochCache({self._entries})"

    def common_prefix_length(self, other: LeaderEpochCache) -> int:
        """How many leading entries the two histories share."""
        a, b = self._entries, other._entries
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def prefix(self, n: int) -> LeaderEpochCache:
        """The first `n` entries."""
        return self if n >= len(self._entries) else LeaderEpochCache(self._entries[:n])

    def suffix(self, n: int) -> list[EpochEntry]:
        """The entries after the first `n`."""
        return self._entries[n:]

    def assign(self, epoch: int, start_offset: int) -> LeaderEpochCache:
        """The history once a batch of `epoch` is written at `start_offset` (Kafka's
        LeaderEpochFileCache.assign). Unchanged (this same object) if `epoch` is the latest;
        otherwise the entries starting at or after `start_offset` (epochs that got no batch) go,
        and `epoch` starts at `start_offset` unless it is already the latest remaining one.
        CorruptMessageError if a later epoch already has data below `start_offset` (epochs going
        backwards)."""
        epochs = self._entries
        if epochs and epochs[-1][0] == epoch and epochs[-1][1] <= start_offset:
            return self
        kept = list(epochs)
        while kept and (kept[-1][0] >= epoch or kept[-1][1] >= start_offset):
            e, s = kept[-1]
            if s < start_offset:
                if e > epoch:
                    raise CorruptMessageError(
                        f"leader epoch {epoch} at offset {start_offset} follows epoch {e}, which started at {s}"
                    )
                break  # e == epoch: the epoch goes on from where it started
            kept.pop()
        if not kept or kept[-1][0] != epoch:
            kept.append((epoch, start_offset))
        return LeaderEpochCache(kept)

    def append(self, entries: list[EpochEntry]) -> LeaderEpochCache:
        """The history with `entries` (newer epochs, later starts: the caller checked) after it."""
        return LeaderEpochCache(self._entries + entries) if entries else self

    def truncate_from_start(self, start_offset: int) -> LeaderEpochCache:
        """Kafka's truncateFromStart: drop epochs that end before `start_offset`, move the one that
        spans it to start there."""
        epochs = self._entries
        kept = [e for e in epochs if e[1] >= start_offset]
        before = [e for e in epochs if e[1] < start_offset]
        if before and (not kept or kept[0][1] > start_offset):
            kept.insert(0, (before[-1][0], start_offset))
        return LeaderEpochCache(kept)

    def truncate_from_end(self, end_offset: int) -> LeaderEpochCache:
        """Kafka's truncateFromEnd: drop the epochs starting at or after `end_offset`."""
        return LeaderEpochCache(e for e in self._entries if e[1] < end_offset)

    def end_offset_for_epoch(self, epoch: int, log_end_offset: int) -> tuple[int, int]:
        """(epoch, end offset) as Kafka's OffsetForLeaderEpoch: the end offset of the largest epoch
        <= `epoch` is the start offset of the next larger one (`log_end_offset` for the latest
        epoch); (-1, -1) if `epoch` is undefined or above the latest."""
        epochs = self._entries
        if epoch == UNDEFINED_EPOCH or not epochs:
            return UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET
        if epoch == epochs[-1][0]:
            return epoch, log_end_offset
        i = bisect.bisect_right(epochs, (epoch, 1 << 64))
        if i == len(epochs):
            return UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET
        higher_start = epochs[i][1]
        return (epochs[i - 1][0] if i > 0 else epoch), higher_start

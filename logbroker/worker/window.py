"""The in-flight window of the worker runtime: which record runs next, and which offset is safe to commit.

A pure state machine (no threads, no I/O, no clock): the runtime's poll thread `add()`s polled
records, worker slots take them with `next_ready()` and report `complete()` / `fail()`, and the poll
thread asks `commit_offsets()` what to commit. The runtime serialises calls with one lock.

In flight = accepted from poll() and not yet below the partition's commit mark: queued, running,
and finished-but-waiting-for-an-earlier-record (possible when records of one partition run in
parallel). Both `max_records` and `max_bytes` bound it; `free_records()` is what the next poll() may
return (0 when either bound is reached; the bytes bound is soft: one poll may pass it).

Per partition (`_Partition`, one object per *generation*: a revoked and re-assigned partition, or one
whose offsets went backwards, gets a fresh object, so a late completion of an old record is ignored)::

    entries   every in-flight record, in offset order
    mark      the offset to commit: all records before it finished. Advanced by popping finished
              entries off the front, so the commit is the contiguous low-water mark
    committed the offset last committed (starts at the first record's offset: nothing to commit yet)

Entry states::

    QUEUED ──next_ready()──> RUNNING ──complete()──> DONE       (popped once every earlier one is DONE)
       │                        └──────fail()─────> ABANDONED   (lane stays blocked: nothing after it
       └───drop_queued()──────────────────────────> ABANDONED    of its lane runs; never committed)

Ordering (`lane` = the unit that runs one record at a time, in offset order):

    "partition"  lane = partition: records of a partition run one after another, in order; parallelism
                 is across partitions. Nothing after a record runs before it finished (the default)
    "key"        lane = (partition, key): per-key order, parallel across keys; null keys are unordered
    "none"       every record is its own lane: any record may run at any time

Ready lanes are served round-robin, so one busy partition does not starve the others.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Collection, Hashable, Iterable
from typing import Literal

from logbroker.storage.record_batch import Message

TopicPartition = tuple[str, int]
Ordering = Literal["partition", "key", "none"]
ORDERINGS: tuple[Ordering, ...] = ("partition", "key", "none")

# Accounting overhead per record besides key, value and headers (the Message tuple and our Entry).
ENTRY_OVERHEAD_BYTES = 200


class EntryState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ABANDONED = "abandoned"


def message_bytes(message: Message) -> int:
    """What a record costs the window: key, value, headers and a fixed overhead."""
    size = ENTRY_OVERHEAD_BYTES + len(message.key or b"") + len(message.value or b"")
    for k, v in message.headers:
        size += len(k) + len(v or b"")
    return size


class _Partition:
    __slots__ = ("tp", "entries", "mark", "committed", "last_offset")

    def __init__(self, tp: TopicPartition, first_offset: int) -> None:
        self.tp = tp
        self.entries: deque[Entry] = deque()
        self.mark = first_offset
        self.committed = first_offset
        self.last_offset = first_offset - 1

    def commit_offset(self) -> int:
        return self.entries[0].message.offset if self.entries else self.mark


class Entry:
    """One record in the window; the runtime hands it back to `complete()` / `fail()`."""

    __slots__ = ("message", "partition", "lane", "state", "size_bytes")

    def __init__(self, message: Message, partition: _Partition, lane: Hashable, size_bytes: int) -> None:
        self.message = message
        self.partition = partition
        self.lane = lane
        self.state = EntryState.QUEUED
        self.size_bytes = size_bytes

    def __repr__(self) -> str:
        m = self.message
        return f"Entry({m.topic}-{m.partition}@{m.offset}, {self.state.value})"


class InFlightWindow:
    def __init__(self, max_records: int, max_bytes: int, ordering: Ordering = "partition") -> None:
        if max_records <= 0 or max_bytes <= 0:
            raise ValueError("max_records and max_bytes must be positive")
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {', '.join(ORDERINGS)}, not {ordering!r}")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.ordering: Ordering = ordering
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._lanes: dict[Hashable, deque[Entry]] = {}  # queued entries per lane
        self._busy: set[Hashable] = set()  # lanes with a RUNNING (or failed) entry
        self._ready: deque[Hashable] = deque()  # lanes with queued entries, not busy; each at most once
        self.records = 0  # in flight
        self.bytes = 0
        self.running = 0

    # -- capacity --------------------------------------------------------------------------------

    def free_records(self) -> int:
        """How many records the next poll() may return (0: the window is full)."""
        if self.bytes >= self.max_bytes:
            return 0
        return max(0, self.max_records - self.records)

    def queued(self) -> int:
        return sum(len(q) for q in self._lanes.values())

    def partitions(self) -> set[TopicPartition]:
        return set(self._partitions)

    # -- records in ------------------------------------------------------------------------------

    def add(self, messages: Iterable[Message]) -> None:
        """Accept polled records: at most `free_records()` of them (a bug otherwise)."""
        for m in messages:
            assert self.records < self.max_records, "window overrun: poll more than free_records()"
            tp = (m.topic, m.partition)
            p = self._partitions.get(tp)
            if p is not None and m.offset <= p.last_offset:
                # The consumer's position went backwards (a reset after log truncation): start over.
                self._retire(p)
                p = None
            if p is None:
                p = self._partitions[tp] = _Partition(tp, m.offset)
            p.last_offset = m.offset
            entry = Entry(m, p, self._lane(p, m), message_bytes(m))
            p.entries.append(entry)
            self.records += 1
            self.bytes += entry.size_bytes
            q = self._lanes.get(entry.lane)
            if q is None:
                q = self._lanes[entry.lane] = deque()
            q.append(entry)
            if len(q) == 1 and entry.lane not in self._busy:
                self._ready.append(entry.lane)

    def _lane(self, p: _Partition, m: Message) -> Hashable:
        if self.ordering == "partition":
            return p
        if self.ordering == "key" and m.key is not None:
            return (p, m.key)
        return (p, m.offset)

    # -- records out -----------------------------------------------------------------------------

    def next_ready(self) -> Entry | None:
        """The next record to run (now RUNNING), or None if every queued record waits on its lane."""
        if not self._ready:
            return None
        lane = self._ready.popleft()
        q = self._lanes[lane]
        entry = q.popleft()
        if not q:
            del self._lanes[lane]
        assert entry.state is EntryState.QUEUED
        entry.state = EntryState.RUNNING
        self._busy.add(lane)
        self.running += 1
        return entry

    def complete(self, entry: Entry) -> bool:
        """The handler succeeded (or the record is skipped). False: a stale entry, ignored."""
        if entry.state is not EntryState.RUNNING:
            return False
        entry.state = EntryState.DONE
        self.running -= 1
        self._release_lane(entry)
        p = entry.partition
        if self._partitions.get(p.tp) is not p:
            return False  # revoked or reset meanwhile: the next owner does it again
        entries = p.entries
        while entries and entries[0].state is EntryState.DONE:
            done = entries.popleft()
            p.mark = done.message.offset + 1
            self.records -= 1
            self.bytes -= done.size_bytes
        return True

    def fail(self, entry: Entry) -> None:
        """The record will not finish (handler gave up, or hard stop): never committed, lane blocked."""
        if entry.state is not EntryState.RUNNING:
            return
        entry.state = EntryState.ABANDONED
        self.running -= 1

    def _release_lane(self, entry: Entry) -> None:
        lane = entry.lane
        self._busy.discard(lane)
        if lane in self._lanes:
            self._ready.append(lane)

    def running_in(self, partitions: Collection[TopicPartition]) -> int:
        """RUNNING records of these partitions (current generations only)."""
        n = 0
        for tp in partitions:
            p = self._partitions.get(tp)
            if p is not None:
                n += sum(1 for e in p.entries if e.state is EntryState.RUNNING)
        return n

    def drop_queued(self, partitions: Collection[TopicPartition] | None = None) -> int:
        """Abandon records not started yet (all, or of these partitions): they are handed back uncommitted."""
        if partitions is None:
            targets = set(self._partitions.values())
        else:
            targets = {self._partitions[tp] for tp in partitions if tp in self._partitions}
        dropped = 0
        for lane in [lane for lane, q in self._lanes.items() if q[0].partition in targets]:
            for entry in self._lanes.pop(lane):
                entry.state = EntryState.ABANDONED
                dropped += 1
        if dropped:
            self._ready = deque(lane for lane in self._ready if lane in self._lanes)
        return dropped

    # -- commits ---------------------------------------------------------------------------------

    def commit_offsets(self, partitions: Collection[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Offsets to commit (next offset to read), for partitions whose mark moved past the last commit."""
        out: dict[TopicPartition, int] = {}
        for tp, p in self._partitions.items():
            if partitions is not None and tp not in partitions:
                continue
            off = p.commit_offset()
            if off > p.committed:
                out[tp] = off
        return out

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            p = self._partitions.get(tp)
            if p is not None and off > p.committed:
                p.committed = off

    # -- assignment ------------------------------------------------------------------------------

    def forget(self, partitions: Collection[TopicPartition]) -> None:
        """Drop revoked partitions: their queued records are abandoned, late completions ignored."""
        for tp in partitions:
            p = self._partitions.get(tp)
            if p is not None:
                self._retire(p)

    def _retire(self, p: _Partition) -> None:
        self.drop_queued([p.tp])
        del self._partitions[p.tp]
        for entry in p.entries:
            self.records -= 1
            self.bytes -= entry.size_bytes
        p.entries.clear()
        # RUNNING entries of p finish later: complete()/fail() ignore them but keep `running` honest;
        # their lanes are keyed by the retired object, so they never block the new generation.
        self._busy = {lane for lane in self._busy if _lane_partition(lane) is not p}


def _lane_partition(lane: Hashable) -> _Partition:
    if isinstance(lane, _Partition):
        return lane
    assert isinstance(lane, tuple)
    owner = lane[0]
    assert isinstance(owner, _Partition)
    return owner

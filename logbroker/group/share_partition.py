"""One partition of a share group (a queue): which records are handed out, to whom, until when, how
often, and which are settled. Pure: time comes in as `now_ms` arguments, records as offset ranges
the shell read from the log; no I/O (group/share_coordinator.py runs it and persists it).

The window::

      settled      |<--------------- in flight (at most max_in_flight_records) -------->|  not read yet
    ...............[start_offset ........................................... end_offset)..........
                    each offset: state, delivery count, owner, until_ms, expires_ms, timestamp

- `start_offset`: every record below it is settled (acknowledged or archived).
- `end_offset`: the next offset the shell reads into the window (`add_records`); the window never
  holds more than `max_in_flight_records` offsets (the shell takes part of a batch that does not
  fit, and reads the rest again later), so memory is bounded however large the backlog: a window
  full of unsettled records hands out nothing new until some settle.

Record states (KIP-932)::

    AVAILABLE --acquire (count += 1, lock until now+lock_ms)--> ACQUIRED
    ACQUIRED --ACCEPT / GAP--> ACKNOWLEDGED                             (settled)
    ACQUIRED --RELEASE, lock expiry, owner gone--> AVAILABLE after a backoff   (count < max)
                                                --> ARCHIVED, dead letter       (count >= max)
    ACQUIRED --REJECT--> ARCHIVED, dead letter                           (settled)
    AVAILABLE past its TTL --> ARCHIVED (dead letter if the group asks)  (settled)

Delayed records: a record produced with a delivery time more than DEFER_AFTER_MS ahead does not
wait in the window (a backlog of them would fill it and hold back every record after them): it
moves to `deferred` (share_deferred.py: the same lifecycle, stored sparse, indexed by due time,
persisted in chunks) and its window slot is settled (DEFERRED). Records released with a delay stay
in the window.

An AVAILABLE record's `until_ms` is when it may be handed out (a release delay, a retry backoff, a
producer's delivery time); an ACQUIRED record's is when its lock ends. A settle is all or nothing
per range, and only by the member holding every record of the range with its lock still running:
otherwise INVALID_RECORD_STATE (nothing changes), or OFFSET_OUT_OF_RANGE outside the window.

Per-key FIFO (settings.ordering == "key"; SQS FIFO message groups, Pulsar Key_Shared): the shell
passes each record's key hash (`key_hash`: mmh3 64-bit, stable across processes; None for a record
without a key) to `add_records`, kept in `_keys` (absolute offset -> hash, keyed records only, so
the unordered path pays nothing). `acquire` then walks the unsettled records in offset order and
hands out a keyed record only if it is the first unsettled record of its key in the window: a key
with an ACQUIRED record, or an earlier AVAILABLE one that is not due yet (released with a delay or
backoff, lock expired, owner gone), hands out nothing more until that record settles. So a key is
never acquired twice at once and its records settle in offset order, while other keys go on. Hash
collisions only order two keys together (never break an order). Records without a key are
unordered. With ordering "key" records are never deferred (they wait in the window, due time and
all), so a delayed record holds back its key's later records. Switching a group to "key" orders the
records read into the window from then on (those already in it have no key hash: unordered).
The cost is a walk over the window (at most max_in_flight_records) per acquire.

Persistence (`snapshot` / `restore`): start and end offsets and, per run of equal offsets, the
state, delivery count and until_ms. An ACQUIRED record is stored as AVAILABLE with its count (the
count was raised when it was handed out, so a failover never gives a record a free delivery:
Pulsar's in-memory redelivery counter was lost on restart, and poison messages never reached their
dead-letter topic). Owners and locks are not stored: after a failover the new coordinator's members
start afresh, and records handed out before it are available again.

Snapshot byte layout (big-endian; built with slice and zlib operations, no per-record loop)::

    int16 version = 1
    int64 start_offset
    int64 end_offset                       n = end_offset - start_offset
    int32 packed_length
    bytes zlib(state[n] + delivery_count[n])    one byte each per offset of the window (an
                                                ACQUIRED state is stored as AVAILABLE)
    int32 sparse_count
    sparse_count x { int32 index, int64 until_ms, int64 expires_ms }   the offsets with a delay
                                                (AVAILABLE only: locks are not stored) or a TTL
    -- version 2 only (written when the window holds unsettled keyed records; else version 1) --
    int32 key_count
    int32 key_packed_length
    bytes zlib(int32 index[key_count] + int64 key_hash[key_count])   the key hash of each unsettled
                                                keyed record (per-key FIFO), indexes ascending

The key hashes are persisted rather than re-derived (re-reading the window from the log on every
failover would cost a read of up to max_in_flight_records records before the first fetch).
"""

from __future__ import annotations

import itertools
import operator
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

import mmh3

from logbroker.errors import InvalidRecordStateError, InvalidRequestError, OffsetOutOfRangeError
from logbroker.group.share_deferred import DEFER_AFTER_MS, Deferred
from logbroker.group.share_headers import REASON_EXPIRED, REASON_MAX_ATTEMPTS, REASON_REJECTED
from logbroker.group.share_settings import ShareSettings


class RecordState(IntEnum):
    AVAILABLE = 0
    ACQUIRED = 1
    ACKNOWLEDGED = 2
    ARCHIVED = 3
    DEFERRED = 4  # settled as far as the window goes: the record waits in `deferred` (share_deferred.py)


class AckType(IntEnum):
    """AcknowledgeRange.type on the wire."""

    ACCEPT = 1
    RELEASE = 2
    REJECT = 3
    RENEW = 4
    GAP = 5


COUNT_MAX = 255  # a delivery count saturates here (max_delivery_attempts is at most 100)
_SNAPSHOT_HEAD = struct.Struct(">hqqi")
_I32 = struct.Struct(">i")
_SPARSE = struct.Struct(">iqq")
_KEYS_HEAD = struct.Struct(">ii")
_BIG_ENDIAN = sys.byteorder == "big"
_IS_AVAILABLE = bytes([1] + [0] * 255)  # bytes.translate table: 1 where the state is AVAILABLE
_VALID_RESTORED = bytes([0, 1, 0, 0, 0] + [1] * 251)  # 0 for the states a snapshot may hold (not ACQUIRED)
_AVAILABLE = bytes([RecordState.AVAILABLE])
_ACQUIRED = bytes([RecordState.ACQUIRED])
_INCREMENT = bytes(min(c + 1, 255) for c in range(256))  # bytes.translate table: count + 1, saturating
_PERSISTED_STATE = bytes([0, 0, 2, 3] + list(range(4, 256)))  # ACQUIRED is stored as AVAILABLE


def key_hash(key: bytes | None) -> int | None:
    """A record key's hash for per-key FIFO (stable across processes: it is persisted)."""
    return None if key is None else mmh3.hash64(key, signed=True)[0]


@dataclass(frozen=True)
class DeadLetter:
    """A record the shell must copy to the dead-letter topic (or drop with a log line)."""

    offset: int
    delivery_count: int
    reason: str          # share_headers.REASON_*
    reason_text: str = ""


@dataclass(frozen=True)
class Acquired:
    first_offset: int
    last_offset: int
    delivery_count: int


@dataclass
class Counters:
    """Since this coordinator loaded the partition (not persisted)."""

    acknowledged: int = 0
    dead_lettered: int = 0
    expired: int = 0
    redelivered: int = 0  # acquisitions with a delivery count above 1 (never decreases)
    locks_lost: int = 0  # records given back because their lock ran out
    filtered: int = 0    # records the group's filter did not match (settled unseen: add_filtered)


@dataclass
class SharePartition:
    settings: ShareSettings
    start_offset: int
    end_offset: int = -1
    _state: bytearray = field(default_factory=bytearray)
    _count: bytearray = field(default_factory=bytearray)
    _owner: list[str | None] = field(default_factory=list)
    _until_ms: list[int] = field(default_factory=list)
    _expires_ms: list[int] = field(default_factory=list)   # 0: no TTL
    _timestamp_ms: list[int] = field(default_factory=list)
    next_lock_deadline_ms: int | None = None   # the earliest lock to check in `expire`
    counters: Counters = field(default_factory=Counters)
    deferred: Deferred = field(default_factory=Deferred)  # delayed records outside the window
    _keys: dict[int, int] = field(default_factory=dict)  # offset -> key hash (ordering "key"; offset order)

    def __post_init__(self) -> None:
        if self.end_offset < self.start_offset:
            self.end_offset = self.start_offset

    # -- the window ------------------------------------------------------------------------------

    @property
    def window_size(self) -> int:
        return self.end_offset - self.start_offset

    def room(self) -> int:
        """How many more offsets the window takes before it is full."""
        return max(0, self.settings.max_in_flight_records - self.window_size)

    def add_records(self, first_offset: int, last_offset: int, timestamp_ms: int, *,
                    until_ms: int = 0, expires_ms: int = 0, now_ms: int | None = None,
                    keys: list[int | None] | None = None) -> None:
        """Records [first, last] read from the log join the window as AVAILABLE. Offsets between
        end_offset and first_offset hold no record (compacted away, or control batches): they join
        as settled. Ranges at or below end_offset are ignored (read twice). Records due more than
        DEFER_AFTER_MS after `now_ms` go to `deferred` while it has room (their slots settled).
        `keys`: each record's key hash (`key_hash`), kept only with ordering "key"."""
        if last_offset < self.end_offset:
            return
        if first_offset > self.end_offset:
            self._extend(first_offset - self.end_offset, RecordState.ACKNOWLEDGED, timestamp_ms, 0, 0)
        first = max(first_offset, self.end_offset)
        n = last_offset - first + 1
        keyed = self.settings.ordering == "key"
        if keyed and keys is not None:
            if len(keys) != last_offset - first_offset + 1:
                raise ValueError(f"{len(keys)} key hashes for offsets {first_offset}..{last_offset}")
            for offset, k in zip(range(first, last_offset + 1), keys[first - first_offset:], strict=True):
                if k is not None:
                    self._keys[offset] = k
        if not keyed and now_ms is not None and until_ms > now_ms + DEFER_AFTER_MS and self.deferred.has_room(n):
            for offset in range(first, last_offset + 1):
                self.deferred.add(offset, until_ms, expires_ms)
            self._extend(n, RecordState.DEFERRED, timestamp_ms, 0, 0)
            return
        self._extend(n, RecordState.AVAILABLE, timestamp_ms, until_ms, expires_ms)

    def add_filtered(self, first_offset: int, last_offset: int, timestamp_ms: int) -> None:
        """Records [first, last] read from the log that the group's filter (share_settings.filter)
        does not match: they join the window settled (ARCHIVED) and are never handed out, never
        dead-lettered, and count as no delivery. Offsets between end_offset and first_offset join
        settled, as in `add_records`; ranges at or below end_offset are ignored (read twice)."""
        if last_offset < self.end_offset:
            return
        if first_offset > self.end_offset:
            self._extend(first_offset - self.end_offset, RecordState.ACKNOWLEDGED, timestamp_ms, 0, 0)
        n = last_offset - self.end_offset + 1
        self._extend(n, RecordState.ARCHIVED, timestamp_ms, 0, 0)
        self.counters.filtered += n

    def add_gap(self, last_offset: int) -> None:
        """Offsets up to `last_offset` hold no record (compacted away, control batches): they join
        the window settled."""
        if last_offset >= self.end_offset:
            self._extend(last_offset - self.end_offset + 1, RecordState.ACKNOWLEDGED, 0, 0, 0)

    def skip_to(self, offset: int) -> None:
        """The log no longer has records below `offset` (retention deleted them): settle them."""
        if offset <= self.start_offset:
            return
        if offset > self.end_offset:
            self._extend(offset - self.end_offset, RecordState.ARCHIVED, 0, 0, 0)
        for i in range(offset - self.start_offset):
            if self._state[i] in (RecordState.AVAILABLE, RecordState.ACQUIRED):
                self._state[i] = RecordState.ARCHIVED
        self.deferred.remove_below(offset)
        self.advance()

    def _extend(self, n: int, state: RecordState, timestamp_ms: int, until_ms: int, expires_ms: int) -> None:
        self._state += bytes([state]) * n
        self._count += bytes(n)
        self._owner += [None] * n
        self._until_ms += [until_ms] * n
        self._expires_ms += [expires_ms] * n
        self._timestamp_ms += [timestamp_ms] * n
        self.end_offset += n
        if state >= RecordState.ACKNOWLEDGED:
            self.advance()

    def advance(self) -> None:
        """Move start_offset past the settled records at the front of the window."""
        state = self._state
        unsettled = [e for e in (state.find(_AVAILABLE), state.find(_ACQUIRED)) if e >= 0]
        n = min(unsettled) if unsettled else len(state)
        if n:
            del state[:n], self._count[:n], self._owner[:n], self._until_ms[:n], self._expires_ms[:n]
            del self._timestamp_ms[:n]
            self.start_offset += n
            keys = self._keys
            while keys:
                first = next(iter(keys))
                if first >= self.start_offset:
                    break
                del keys[first]

    # -- handing out -----------------------------------------------------------------------------

    def acquire(self, member: str, max_records: int, now_ms: int) -> tuple[list[Acquired], list[DeadLetter]]:
        """Hand out up to `max_records` available, due records, oldest offset first; returns them
        as runs of equal delivery count, and the dead letters of records found past their TTL.
        A run of available records that are all due and without TTL is taken with slice operations
        (the common case); others record by record."""
        out: list[Acquired] = []
        dead: list[DeadLetter] = []
        state, until, expires = self._state, self._until_ms, self._expires_ms
        lock_until = now_ms + self.settings.lock_ms
        taken = self._acquire_deferred(member, max_records, now_ms, lock_until, out, dead) if self.deferred else 0
        sparse = bool(out)
        if self.settings.ordering == "key":
            taken += self._acquire_keyed(member, max_records - taken, now_ms, lock_until, out, dead)
            i = -1
        else:
            i = state.find(_AVAILABLE)
        while i >= 0 and taken < max_records:
            j = min(self._run_end(i), i + max_records - taken)
            if max(until[i:j]) <= now_ms and not any(expires[i:j]):
                self._take(i, j, member, lock_until, out)
                taken += j - i
            else:
                for k in range(i, j):
                    if expires[k] and expires[k] <= now_ms:
                        dead += self._archive_expired(k)
                    elif until[k] <= now_ms:
                        self._take(k, k + 1, member, lock_until, out)
                        taken += 1
            i = state.find(_AVAILABLE, j)
        if taken and (self.next_lock_deadline_ms is None or lock_until < self.next_lock_deadline_ms):
            self.next_lock_deadline_ms = lock_until
        if dead:
            self.advance()
        if sparse:
            out = _merge_runs(out)
        return out, dead

    def _acquire_keyed(self, member: str, max_records: int, now_ms: int, lock_until: int,
                       out: list[Acquired], dead: list[DeadLetter]) -> int:
        """`acquire` with ordering "key": the due heads of their keys, in offset order (module doc)."""
        taken = 0
        for i in self._key_heads(now_ms, dead):
            if taken >= max_records:
                break
            self._take(i, i + 1, member, lock_until, out)
            taken += 1
        return taken

    def _key_heads(self, now_ms: int, dead: list[DeadLetter] | None) -> Iterator[int]:
        """The indexes of the AVAILABLE, due records that are the first unsettled record of their key
        (or have none), in offset order. With `dead` given, records past their TTL are archived
        (their dead letters appended) and do not hold back their key."""
        state, until, expires, keys = self._state, self._until_ms, self._expires_ms, self._keys
        start = self.start_offset
        blocked: set[int] = set()
        for i, s in enumerate(state):
            if s > RecordState.ACQUIRED:
                continue
            k = keys.get(start + i) if keys else None
            if k is not None:
                if k in blocked:
                    continue
                blocked.add(k)
            if s == RecordState.ACQUIRED:
                continue
            if expires[i] and expires[i] <= now_ms:
                if dead is not None:
                    dead += self._archive_expired(i)
                if k is not None:
                    blocked.discard(k)
            elif until[i] <= now_ms:
                yield i

    def _acquire_deferred(self, member: str, max_records: int, now_ms: int, lock_until: int,
                          out: list[Acquired], dead: list[DeadLetter]) -> int:
        taken = 0
        while taken < max_records:
            got = self.deferred.pop_due(now_ms)
            if got is None:
                break
            offset, e = got
            if e.expires_ms and e.expires_ms <= now_ms:
                self.deferred.remove(offset)
                self.counters.expired += 1
                if self.settings.dead_letter_expired:
                    self.counters.dead_lettered += 1
                    dead.append(DeadLetter(offset, e.count, REASON_EXPIRED))
                continue
            c = self.deferred.acquire(offset, e, member, lock_until)
            if c > 1:
                self.counters.redelivered += 1
            out.append(Acquired(offset, offset, c))
            taken += 1
        return taken

    def _run_end(self, i: int) -> int:
        """The end of the run of AVAILABLE states starting at `i`."""
        state = self._state
        ends = [e for e in (state.find(b"\x01", i), state.find(b"\x02", i), state.find(b"\x03", i),
                            state.find(b"\x04", i)) if e >= 0]
        return min(ends) if ends else len(state)

    def _take(self, i: int, j: int, member: str, lock_until: int, out: list[Acquired]) -> None:
        """Acquire the available records [i, j) for `member`, appending them to `out` as runs."""
        n = j - i
        self._state[i:j] = _ACQUIRED * n
        counts = self._count[i:j].translate(_INCREMENT)
        self._count[i:j] = counts
        self._owner[i:j] = [member] * n
        self._until_ms[i:j] = [lock_until] * n
        offset = self.start_offset + i
        for c, group in itertools.groupby(counts):
            k = sum(1 for _ in group)
            if c > 1:
                self.counters.redelivered += k
            if out and out[-1].last_offset == offset - 1 and out[-1].delivery_count == c:
                out[-1] = Acquired(out[-1].first_offset, offset + k - 1, c)
            else:
                out.append(Acquired(offset, offset + k - 1, c))
            offset += k
    def unacquire(self, member: str, runs: list[Acquired]) -> None:
        """Undo `acquire` for runs that could not be handed out (the shell failed to read their
        records): still held by `member` with the count they were acquired with, they are
        available again at once with the count they had before (they were never delivered)."""
        state, count, owner = self._state, self._count, self._owner
        for r in runs:
            for offset in range(r.first_offset, r.last_offset + 1):
                e = self.deferred.entries.get(offset)
                if e is not None and e.state == 1 and e.owner == member and e.count == r.delivery_count:
                    e.count = max(e.count - 1, 0)
                    self.deferred.make_available(offset, e, 0)
            for offset in range(max(r.first_offset, self.start_offset), min(r.last_offset + 1, self.end_offset)):
                i = offset - self.start_offset
                if state[i] != RecordState.ACQUIRED or owner[i] != member or count[i] != r.delivery_count:
                    continue
                state[i] = RecordState.AVAILABLE
                count[i] = max(count[i] - 1, 0)
                owner[i] = None
                self._until_ms[i] = 0
                # counters.redelivered is not taken back: it is a Prometheus counter, which never
                # goes down (a redelivery whose records could not be read counts once anyway)

    def _archive_expired(self, i: int) -> list[DeadLetter]:
        self._state[i] = RecordState.ARCHIVED
        self.counters.expired += 1
        if not self.settings.dead_letter_expired:
            return []
        self.counters.dead_lettered += 1
        return [DeadLetter(self.start_offset + i, self._count[i], REASON_EXPIRED)]

    def available_now(self, now_ms: int) -> bool:
        """Whether `acquire` would hand out something now (without changing anything)."""
        if self.settings.ordering == "key":
            return next(self._key_heads(now_ms, None), None) is not None
        state, until = self._state, self._until_ms
        i = state.find(_AVAILABLE)
        while i >= 0:
            if until[i] <= now_ms:
                return True
            i = state.find(_AVAILABLE, i + 1)
        return False

    def next_due_ms(self) -> int | None:
        """The earliest time an available record becomes due or a lock ends (the shell's timer)."""
        best: int | None = None
        state, until = self._state, self._until_ms
        for i, s in enumerate(state):
            if s <= RecordState.ACQUIRED and (best is None or until[i] < best):
                best = until[i]
        return best

    # -- settling --------------------------------------------------------------------------------

    def acknowledge(self, member: str, first_offset: int, last_offset: int, ack_type: int, now_ms: int,
                    delay_ms: int = 0, reason: str = "") -> list[DeadLetter]:
        """Settle (or renew) [first, last] for `member`: all or nothing. Raises OffsetOutOfRangeError
        (outside the window), InvalidRecordStateError (a record this member does not hold, or
        whose lock has run out), InvalidRequestError (a bad type or delay)."""
        if ack_type not in AckType.__members__.values():
            raise InvalidRequestError(f"unknown acknowledgement type {ack_type}")
        if delay_ms < 0:
            raise InvalidRequestError(f"negative delay {delay_ms} ms")
        if ack_type == AckType.RENEW and not 0 < delay_ms <= self.settings.lock_ms * 10:
            raise InvalidRequestError(f"a lock renewal of {delay_ms} ms is outside (0, {self.settings.lock_ms * 10}]")
        if self.deferred and 0 <= first_offset <= last_offset < self.end_offset \
                and self.deferred.in_range(first_offset, last_offset):
            return self._acknowledge_sparse(member, first_offset, last_offset, ack_type, now_ms, delay_ms, reason)
        self._check_held(member, first_offset, last_offset, now_ms)
        lo, hi = first_offset - self.start_offset, last_offset - self.start_offset + 1
        dead: list[DeadLetter] = []
        if ack_type in (AckType.ACCEPT, AckType.GAP):
            self._settle(lo, hi, RecordState.ACKNOWLEDGED)
            self.counters.acknowledged += hi - lo
        elif ack_type == AckType.REJECT:
            self._settle(lo, hi, RecordState.ARCHIVED)
            dead = [DeadLetter(self.start_offset + i, self._count[i], REASON_REJECTED, reason) for i in range(lo, hi)]
            self.counters.dead_lettered += len(dead)
        elif ack_type == AckType.RENEW:
            until = now_ms + delay_ms
            for i in range(lo, hi):
                self._until_ms[i] = until
        else:
            dead = self._give_back(range(lo, hi), now_ms, delay_ms)
        self.advance()
        return dead

    def _acknowledge_sparse(self, member: str, first_offset: int, last_offset: int, ack_type: int, now_ms: int,
                            delay_ms: int, reason: str) -> list[DeadLetter]:
        """`acknowledge` for a range holding deferred records: offset by offset, all checked first."""
        if last_offset - first_offset >= self.settings.max_in_flight_records + len(self.deferred):
            raise InvalidRequestError(f"range {first_offset}..{last_offset} is longer than what can be in flight")
        entries = self.deferred.entries
        for offset in range(first_offset, last_offset + 1):
            e = entries.get(offset)
            if e is None:
                self._check_held(member, offset, offset, now_ms)
            elif e.state != 1 or e.owner != member or e.until_ms <= now_ms:
                raise InvalidRecordStateError(f"offset {offset} is not held by member {member} (or its lock ran out)")
        dead: list[DeadLetter] = []
        for offset in range(first_offset, last_offset + 1):
            e = entries.get(offset)
            if e is None:
                dead += self.acknowledge(member, offset, offset, ack_type, now_ms, delay_ms, reason)
            elif ack_type in (AckType.ACCEPT, AckType.GAP):
                self.deferred.remove(offset)
                self.counters.acknowledged += 1
            elif ack_type == AckType.REJECT:
                self.deferred.remove(offset)
                self.counters.dead_lettered += 1
                dead.append(DeadLetter(offset, e.count, REASON_REJECTED, reason))
            elif ack_type == AckType.RENEW:
                e.until_ms = now_ms + delay_ms
            else:
                dead += self._give_back_deferred(offset, now_ms, delay_ms)
        return dead

    def _give_back_deferred(self, offset: int, now_ms: int, delay_ms: int = 0) -> list[DeadLetter]:
        e = self.deferred.entries[offset]
        if e.count >= self.settings.max_delivery_attempts:
            self.deferred.remove(offset)
            self.counters.dead_lettered += 1
            return [DeadLetter(offset, e.count, REASON_MAX_ATTEMPTS)]
        self.deferred.make_available(offset, e, now_ms + (delay_ms or self.settings.backoff_ms(e.count)))
        return []

    def _check_held(self, member: str, first_offset: int, last_offset: int, now_ms: int) -> None:
        if first_offset > last_offset:
            raise InvalidRequestError(f"range {first_offset}..{last_offset} is empty")
        if first_offset < 0 or last_offset >= self.end_offset:
            raise OffsetOutOfRangeError(
                f"offsets {first_offset}..{last_offset} are outside the window {self.start_offset}.."
                f"{self.end_offset - 1}: never handed out")
        if first_offset < self.start_offset:
            raise InvalidRecordStateError(f"offset {first_offset} is settled already (below the start offset "
                                          f"{self.start_offset})")
        lo, hi = first_offset - self.start_offset, last_offset - self.start_offset + 1
        state, owner, until = self._state, self._owner, self._until_ms
        if state[lo:hi] == _ACQUIRED * (hi - lo) and owner[lo:hi].count(member) == hi - lo \
                and min(until[lo:hi]) > now_ms:
            return  # the common case, checked with slice operations
        for i in range(lo, hi):
            if state[i] != RecordState.ACQUIRED or owner[i] != member:
                raise InvalidRecordStateError(
                    f"offset {self.start_offset + i} is not held by member {member} "
                    f"({RecordState(state[i]).name.lower()}{'' if owner[i] is None else ' by another member'})")
            if until[i] <= now_ms:
                raise InvalidRecordStateError(f"the lock on offset {self.start_offset + i} ran out")

    def _settle(self, lo: int, hi: int, to: RecordState) -> None:
        self._state[lo:hi] = bytes([to]) * (hi - lo)
        self._owner[lo:hi] = [None] * (hi - lo)

    def _give_back(self, indexes: Iterator[int] | range, now_ms: int, delay_ms: int = 0) -> list[DeadLetter]:
        """Records a member lost (released, lock ended, member gone): available again after the
        delay (or the group's backoff), or archived after the last attempt."""
        dead: list[DeadLetter] = []
        s = self.settings
        for i in indexes:
            c = self._count[i]
            self._owner[i] = None
            if c >= s.max_delivery_attempts:
                self._state[i] = RecordState.ARCHIVED
                dead.append(DeadLetter(self.start_offset + i, c, REASON_MAX_ATTEMPTS))
            else:
                self._state[i] = RecordState.AVAILABLE
                self._until_ms[i] = now_ms + (delay_ms or s.backoff_ms(c))
        self.counters.dead_lettered += len(dead)
        return dead

    def expire(self, now_ms: int) -> list[DeadLetter]:
        """Locks that ran out by `now_ms`: those records are given back (or archived)."""
        if self.next_lock_deadline_ms is None or now_ms < self.next_lock_deadline_ms:
            return []
        state, until = self._state, self._until_ms
        lost: list[int] = []
        nxt: int | None = None
        i = state.find(_ACQUIRED)
        while i >= 0:
            if until[i] <= now_ms:
                lost.append(i)
            elif nxt is None or until[i] < nxt:
                nxt = until[i]
            i = state.find(_ACQUIRED, i + 1)
        dead = self._give_back(iter(lost), now_ms)
        self.counters.locks_lost += len(lost)
        if self.deferred:
            lost_deferred, nxt_deferred = self.deferred.locks_ended(now_ms)
            self.counters.locks_lost += len(lost_deferred)
            for offset in lost_deferred:
                dead += self._give_back_deferred(offset, now_ms)
            if nxt_deferred is not None and (nxt is None or nxt_deferred < nxt):
                nxt = nxt_deferred
        self.next_lock_deadline_ms = nxt
        self.advance()
        return dead

    def release_member(self, member: str, now_ms: int) -> list[DeadLetter]:
        """The member left or its session ended: everything it holds is given back."""
        state, owner = self._state, self._owner
        held = [i for i in range(len(state)) if state[i] == RecordState.ACQUIRED and owner[i] == member]
        dead = self._give_back(iter(held), now_ms)
        for offset in self.deferred.held(member):
            dead += self._give_back_deferred(offset, now_ms)
        self.advance()
        return dead

    def purge(self, up_to: int) -> int:
        """Settle everything below `up_to` (a purge); returns how many unsettled records it settled."""
        n = min(up_to, self.end_offset) - self.start_offset
        settled = sum(1 for i in range(max(n, 0)) if self._state[i] <= RecordState.ACQUIRED)
        settled += self.deferred.remove_below(up_to)
        self.skip_to(up_to)
        return settled

    # -- describing --------------------------------------------------------------------------------

    def held_by(self, member: str) -> int:
        state, owner = self._state, self._owner
        window = sum(1 for i in range(len(state)) if state[i] == RecordState.ACQUIRED and owner[i] == member)
        return window + (len(self.deferred.held(member)) if self.deferred else 0)

    def describe(self, now_ms: int) -> dict[str, int]:
        state, until = self._state, self._until_ms
        acquired = state.count(_ACQUIRED)
        available = delayed = 0
        oldest: int | None = None
        for i, s in enumerate(state):
            if s == RecordState.AVAILABLE:
                if until[i] > now_ms:
                    delayed += 1
                else:
                    available += 1
            if s <= RecordState.ACQUIRED and oldest is None:
                oldest = self._timestamp_ms[i]
        for e in self.deferred.entries.values():
            if e.state == 1:
                acquired += 1
            elif e.until_ms > now_ms:
                delayed += 1
            else:
                available += 1
        return {
            "start_offset": self.start_offset, "end_offset": self.end_offset,
            "in_flight": acquired + available + delayed, "acquired": acquired, "available": available,
            "delayed": delayed, "oldest_unsettled_age_ms": max(0, now_ms - oldest) if oldest else 0,
            "acknowledged": self.counters.acknowledged, "dead_lettered": self.counters.dead_lettered,
            "expired": self.counters.expired,
        }

    # -- persistence -------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The durable state (module doc)."""
        state, until, expires = self._state, self._until_ms, self._expires_ms
        n = len(state)
        packed = zlib.compress(bytes(state.translate(_PERSISTED_STATE)) + bytes(self._count), 1)
        delayed = itertools.compress(range(n), map(operator.and_, state.translate(_IS_AVAILABLE), map(bool, until)))
        sparse = sorted(set(delayed).union(itertools.compress(range(n), expires)))
        body = b"".join(_SPARSE.pack(i, until[i] if state[i] == RecordState.AVAILABLE else 0, expires[i])
                        for i in sparse)
        keys = self._snapshot_keys()
        return (_SNAPSHOT_HEAD.pack(2 if keys else 1, self.start_offset, self.end_offset, len(packed)) + packed
                + _I32.pack(len(sparse)) + body + keys)

    def _snapshot_keys(self) -> bytes:
        """The version-2 tail: key hashes of the unsettled keyed records (b"" when there are none)."""
        if not self._keys:
            return b""
        start, state = self.start_offset, self._state
        idx = array("i", (o - start for o in self._keys if state[o - start] <= RecordState.ACQUIRED))
        if not idx:
            return b""
        hashes = array("q", (self._keys[start + i] for i in idx))
        if not _BIG_ENDIAN:
            idx.byteswap()
            hashes.byteswap()
        packed = zlib.compress(idx.tobytes() + hashes.tobytes(), 1)
        return _KEYS_HEAD.pack(len(idx), len(packed)) + packed

    def _restore_keys(self, data: bytes, pos: int) -> None:
        """Read the version-2 tail at `pos` (ValueError on junk)."""
        n = len(self._state)
        if len(data) < pos + _KEYS_HEAD.size:
            raise ValueError("share-partition snapshot key section too short")
        count, plen = _KEYS_HEAD.unpack_from(data, pos)
        pos += _KEYS_HEAD.size
        if not 0 < count <= n or len(data) != pos + plen:
            raise ValueError("bad share-partition snapshot key section")
        try:
            raw = zlib.decompressobj().decompress(data[pos:], 12 * count + 1)
        except zlib.error as e:
            raise ValueError(f"bad share-partition snapshot keys: {e}") from None
        if len(raw) != 12 * count:
            raise ValueError("bad share-partition snapshot key section length")
        idx, hashes = array("i", raw[:4 * count]), array("q", raw[4 * count:])
        if not _BIG_ENDIAN:
            idx.byteswap()
            hashes.byteswap()
        if min(idx) < 0 or max(idx) >= n or any(a >= b for a, b in zip(idx, idx[1:], strict=False)):
            raise ValueError("bad share-partition snapshot key index")
        self._keys = {self.start_offset + i: h for i, h in zip(idx, hashes, strict=True)}

    @classmethod
    def restore(cls, data: bytes, settings: ShareSettings, deferred_chunks: dict[int, bytes] | None = None) -> SharePartition:
        """From `snapshot` bytes and the deferred records' chunks; raises ValueError on junk
        (bounded: a window longer than the largest allowed is refused before anything is allocated)."""
        if len(data) < _SNAPSHOT_HEAD.size:
            raise ValueError("share-partition snapshot too short")
        version, start, end, plen = _SNAPSHOT_HEAD.unpack_from(data, 0)
        n = end - start
        if version not in (1, 2) or start < 0 or not 0 <= n <= 1_000_000 or not 0 <= plen <= len(data) - _SNAPSHOT_HEAD.size - 4:
            raise ValueError("bad share-partition snapshot")
        pos = _SNAPSHOT_HEAD.size
        try:
            unpacked = zlib.decompressobj().decompress(data[pos:pos + plen], 2 * n + 1)
        except zlib.error as e:
            raise ValueError(f"bad share-partition snapshot: {e}") from None
        pos += plen
        (nsparse,) = _I32.unpack_from(data, pos)
        pos += 4
        tail = pos + nsparse * _SPARSE.size
        if len(unpacked) != 2 * n or not 0 <= nsparse <= n or (len(data) != tail if version == 1 else len(data) < tail):
            raise ValueError("bad share-partition snapshot body")
        states = bytearray(unpacked[:n])
        if states.translate(_VALID_RESTORED).count(0) != n:
            raise ValueError("bad share-partition snapshot state")
        sp = cls(settings, start, end)
        sp._state, sp._count = states, bytearray(unpacked[n:])
        sp._owner, sp._until_ms = [None] * n, [0] * n
        sp._expires_ms, sp._timestamp_ms = [0] * n, [0] * n
        for k in range(nsparse):
            i, until_ms, expires_ms = _SPARSE.unpack_from(data, pos + k * _SPARSE.size)
            if not 0 <= i < n:
                raise ValueError("bad share-partition snapshot index")
            sp._until_ms[i], sp._expires_ms[i] = until_ms, expires_ms
        if sp.end_offset != end:
            raise ValueError("share-partition snapshot runs do not cover its window")
        if version == 2:
            sp._restore_keys(data, tail)
        for chunk, body in (deferred_chunks or {}).items():
            sp.deferred.restore_chunk(chunk, body)
        sp.deferred.dirty_chunks.clear()
        sp.advance()
        return sp


def _merge_runs(runs: list[Acquired]) -> list[Acquired]:
    """Runs sorted by offset, neighbours of equal delivery count joined."""
    out: list[Acquired] = []
    for r in sorted(runs, key=lambda r: r.first_offset):
        if out and out[-1].last_offset == r.first_offset - 1 and out[-1].delivery_count == r.delivery_count:
            out[-1] = Acquired(out[-1].first_offset, r.last_offset, r.delivery_count)
        else:
            out.append(r)
    return out

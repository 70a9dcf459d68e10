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

An AVAILABLE record's `until_ms` is when it may be handed out (a release delay, a retry backoff, a
producer's delivery time); an ACQUIRED record's is when its lock ends. A settle is all or nothing
per range, and only by the member holding every record of the range with its lock still running:
otherwise INVALID_RECORD_STATE (nothing changes), or OFFSET_OUT_OF_RANGE outside the window.

Persistence (`snapshot` / `restore`): start and end offsets and, per run of equal offsets, the
state, delivery count and until_ms. An ACQUIRED record is stored as AVAILABLE with its count (the
count was raised when it was handed out, so a failover never gives a record a free delivery:
Pulsar's in-memory redelivery counter was lost on restart, and poison messages never reached their
dead-letter topic). Owners and locks are not stored: after a failover the new coordinator's members
start afresh, and records handed out before it are available again.

Snapshot byte layout (big-endian)::

    int16 version = 0
    int64 start_offset
    int64 end_offset
    int32 run_count
    run_count x { int32 first (offset - start_offset), int32 length, int8 state, int16 delivery_count,
                  int64 until_ms, int64 expires_ms }
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from logbroker.errors import InvalidRecordStateError, InvalidRequestError, OffsetOutOfRangeError
from logbroker.group.share_headers import REASON_EXPIRED, REASON_MAX_ATTEMPTS, REASON_REJECTED
from logbroker.group.share_settings import ShareSettings


class RecordState(IntEnum):
    AVAILABLE = 0
    ACQUIRED = 1
    ACKNOWLEDGED = 2
    ARCHIVED = 3


class AckType(IntEnum):
    """AcknowledgeRange.type on the wire."""

    ACCEPT = 1
    RELEASE = 2
    REJECT = 3
    RENEW = 4
    GAP = 5


COUNT_MAX = 255  # a delivery count saturates here (max_delivery_attempts is at most 100)
_SNAPSHOT_HEAD = struct.Struct(">hqqi")
_RUN = struct.Struct(">iibhqq")
_AVAILABLE = bytes([RecordState.AVAILABLE])
_ACQUIRED = bytes([RecordState.ACQUIRED])


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
    redelivered: int = 0


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
                    until_ms: int = 0, expires_ms: int = 0) -> None:
        """Records [first, last] read from the log join the window as AVAILABLE. Offsets between
        end_offset and first_offset hold no record (compacted away, or control batches): they join
        as settled. Ranges at or below end_offset are ignored (read twice)."""
        if last_offset < self.end_offset:
            return
        if first_offset > self.end_offset:
            self._extend(first_offset - self.end_offset, RecordState.ACKNOWLEDGED, timestamp_ms, 0, 0)
        first = max(first_offset, self.end_offset)
        self._extend(last_offset - first + 1, RecordState.AVAILABLE, timestamp_ms, until_ms, expires_ms)

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
        n = 0
        while n < len(state) and state[n] >= RecordState.ACKNOWLEDGED:
            n += 1
        if n:
            del state[:n], self._count[:n], self._owner[:n], self._until_ms[:n], self._expires_ms[:n]
            del self._timestamp_ms[:n]
            self.start_offset += n

    # -- handing out -----------------------------------------------------------------------------

    def acquire(self, member: str, max_records: int, now_ms: int) -> tuple[list[Acquired], list[DeadLetter]]:
        """Hand out up to `max_records` available, due records, oldest offset first; returns them
        as runs of equal delivery count, and the dead letters of records found past their TTL."""
        out: list[Acquired] = []
        dead: list[DeadLetter] = []
        state, count, until, expires = self._state, self._count, self._until_ms, self._expires_ms
        lock_until = now_ms + self.settings.lock_ms
        taken = 0
        i = state.find(_AVAILABLE)
        while i >= 0 and taken < max_records:
            if expires[i] and expires[i] <= now_ms:
                dead += self._archive_expired(i)
            elif until[i] <= now_ms:
                c = min(count[i] + 1, COUNT_MAX)
                count[i] = c
                state[i] = RecordState.ACQUIRED
                self._owner[i] = member
                until[i] = lock_until
                if c > 1:
                    self.counters.redelivered += 1
                offset = self.start_offset + i
                if out and out[-1].last_offset == offset - 1 and out[-1].delivery_count == c:
                    out[-1] = Acquired(out[-1].first_offset, offset, c)
                else:
                    out.append(Acquired(offset, offset, c))
                taken += 1
            i = state.find(_AVAILABLE, i + 1)
        if taken and (self.next_lock_deadline_ms is None or lock_until < self.next_lock_deadline_ms):
            self.next_lock_deadline_ms = lock_until
        if dead:
            self.advance()
        return out, dead

    def unacquire(self, member: str, runs: list[Acquired]) -> None:
        """Undo `acquire` for runs that could not be handed out (the shell failed to read their
        records): still held by `member` with the count they were acquired with, they are
        available again at once with the count they had before (they were never delivered)."""
        state, count, owner = self._state, self._count, self._owner
        for r in runs:
            for offset in range(max(r.first_offset, self.start_offset), min(r.last_offset + 1, self.end_offset)):
                i = offset - self.start_offset
                if state[i] != RecordState.ACQUIRED or owner[i] != member or count[i] != r.delivery_count:
                    continue
                state[i] = RecordState.AVAILABLE
                count[i] = max(count[i] - 1, 0)
                owner[i] = None
                self._until_ms[i] = 0
                if count[i] >= 1:
                    self.counters.redelivered -= 1

    def _archive_expired(self, i: int) -> list[DeadLetter]:
        self._state[i] = RecordState.ARCHIVED
        self.counters.expired += 1
        if not self.settings.dead_letter_expired:
            return []
        self.counters.dead_lettered += 1
        return [DeadLetter(self.start_offset + i, self._count[i], REASON_EXPIRED)]

    def available_now(self, now_ms: int) -> bool:
        """Whether `acquire` would hand out something now (without changing anything)."""
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
        for i in range(lo, hi):
            if state[i] != RecordState.ACQUIRED or owner[i] != member:
                raise InvalidRecordStateError(
                    f"offset {self.start_offset + i} is not held by member {member} "
                    f"({RecordState(state[i]).name.lower()}{'' if owner[i] is None else ' by another member'})")
            if until[i] <= now_ms:
                raise InvalidRecordStateError(f"the lock on offset {self.start_offset + i} ran out")

    def _settle(self, lo: int, hi: int, to: RecordState) -> None:
        self._state[lo:hi] = bytes([to]) * (hi - lo)
        for i in range(lo, hi):
            self._owner[i] = None

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
        self.next_lock_deadline_ms = nxt
        dead = self._give_back(iter(lost), now_ms)
        self.advance()
        return dead

    def release_member(self, member: str, now_ms: int) -> list[DeadLetter]:
        """The member left or its session ended: everything it holds is given back."""
        state, owner = self._state, self._owner
        held = [i for i in range(len(state)) if state[i] == RecordState.ACQUIRED and owner[i] == member]
        dead = self._give_back(iter(held), now_ms)
        self.advance()
        return dead

    def purge(self, up_to: int) -> int:
        """Settle everything below `up_to` (a purge); returns how many unsettled records it settled."""
        n = min(up_to, self.end_offset) - self.start_offset
        settled = sum(1 for i in range(max(n, 0)) if self._state[i] <= RecordState.ACQUIRED)
        self.skip_to(up_to)
        return settled

    # -- describing --------------------------------------------------------------------------------

    def held_by(self, member: str) -> int:
        state, owner = self._state, self._owner
        return sum(1 for i in range(len(state)) if state[i] == RecordState.ACQUIRED and owner[i] == member)

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
        return {
            "start_offset": self.start_offset, "end_offset": self.end_offset,
            "in_flight": acquired + available + delayed, "acquired": acquired, "available": available,
            "delayed": delayed, "oldest_unsettled_age_ms": max(0, now_ms - oldest) if oldest else 0,
            "acknowledged": self.counters.acknowledged, "dead_lettered": self.counters.dead_lettered,
            "expired": self.counters.expired,
        }

    # -- persistence -------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The durable state (module doc): runs of equal (state, count, until, expires)."""
        runs: list[bytes] = []
        state, count, until, expires = self._state, self._count, self._until_ms, self._expires_ms
        n = len(state)
        i = 0
        while i < n:
            s = RecordState.AVAILABLE if state[i] == RecordState.ACQUIRED else state[i]
            u = 0 if state[i] == RecordState.ACQUIRED else until[i]
            key = (s, count[i], u, expires[i])
            j = i + 1
            while j < n:
                sj = RecordState.AVAILABLE if state[j] == RecordState.ACQUIRED else state[j]
                uj = 0 if state[j] == RecordState.ACQUIRED else until[j]
                if (sj, count[j], uj, expires[j]) != key:
                    break
                j += 1
            runs.append(_RUN.pack(i, j - i, s, count[i], u, expires[i]))
            i = j
        return _SNAPSHOT_HEAD.pack(0, self.start_offset, self.end_offset, len(runs)) + b"".join(runs)

    @classmethod
    def restore(cls, data: bytes, settings: ShareSettings) -> SharePartition:
        """From `snapshot` bytes; raises ValueError on junk (bounded: a window longer than the
        largest allowed is refused before anything is allocated)."""
        if len(data) < _SNAPSHOT_HEAD.size:
            raise ValueError("share-partition snapshot too short")
        version, start, end, nruns = _SNAPSHOT_HEAD.unpack_from(data, 0)
        if version != 0 or start < 0 or not 0 <= end - start <= 1_000_000 or nruns < 0 \
                or len(data) != _SNAPSHOT_HEAD.size + nruns * _RUN.size:
            raise ValueError("bad share-partition snapshot")
        sp = cls(settings, start, start)
        pos = _SNAPSHOT_HEAD.size
        for _ in range(nruns):
            first, length, s, c, u, e = _RUN.unpack_from(data, pos)
            pos += _RUN.size
            if first != sp.window_size or length <= 0 or s not in (0, 2, 3) or not 0 <= c <= COUNT_MAX:
                raise ValueError("bad share-partition snapshot run")
            sp._state += bytes([s]) * length
            sp._count += bytes([c]) * length
            sp._owner += [None] * length
            sp._until_ms += [u] * length
            sp._expires_ms += [e] * length
            sp._timestamp_ms += [0] * length
            sp.end_offset += length
        if sp.end_offset != end:
            raise ValueError("share-partition snapshot runs do not cover its window")
        sp.advance()
        return sp

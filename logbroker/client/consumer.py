"""The consumer: fetches whole record batches from partition leaders and decodes them lazily.

Pipeline, per leader broker: a `Fetch` in flight (covering every assigned partition that broker
leads and that is fetchable; while tailing on the record transport, read by poll() itself, or on
the broker's FetchStream without one; a unary call after a big response: see
STREAM_FETCH_RESPONSE_BYTES_MAX) while `poll()` decodes the previous response; a
second one (over other partitions, on a second stream) may go out while the first long-polls on
caught-up partitions. A response's
next fetch offsets come from its batch headers alone (`iter_batches`), so the next request goes
out before a single record of the previous one is decoded::

    Fetch.future ──> response ──> _Chunk per partition (raw bytes + batch headers) ──> deque
         ^                          │ fetch_offset = last batch's next offset
         └── sent at once ──────────┘
    poll() ──> decode the head chunk's next batch (decode_batch, min_offset = chunk start)
           ──> hand out up to max_records Messages, position = last offset + 1

Per partition (`_PartitionState`)::

    position     next offset poll() returns (None: to be looked up: committed offset, else reset)
    fetch_offset next offset to fetch; ahead of position by what is buffered or in flight
    epoch        bumped by seek()/reset: buffered chunks and in-flight results of older epochs
                 are dropped, so a seek never sees stale records

A partition is fetchable when its position is known, it has no fetch in flight, is not backing
off after an error, and holds at most one undecoded chunk (double buffering: one chunk decoding,
one in flight or waiting). Total undecoded bytes are also capped at 2 x fetch_max_bytes.

Groups (logbroker/client/group_member.py, logbroker/client/coordinator.py)::

    group + subscribe(topics | pattern)  a member of the group: a heartbeat thread keeps the membership
        and receives the assignment the coordinator computed; poll() applies changes on the polling
        thread: revoked partitions first (on_revoke, then a synchronous commit with auto-commit on,
        then their buffered and in-flight records are dropped and the smaller assignment is reported),
        then new ones (on_assign; positions from committed offsets, else auto_offset_reset). No record
        of a partition comes out of poll() after on_revoke for it returned. Fenced (evicted, coordinator
        failed over): every partition is lost (on_lost, default on_revoke; no commit), then it rejoins.
    group + assign()                     manual assignment; commits as a non-member (member id "",
        accepted while the group has no members)
    no group + subscribe()               every partition of the topics (or of the topics matching the
        pattern), partition counts re-read on each metadata refresh

Commits go to the group's coordinator (found with FindCoordinator, followed when it moves), as the
member (id and epoch) when group-managed. Auto-commit runs every `auto_commit_interval_ms` from poll()
(asynchronously: never blocking the polling thread), on revocation and on close() (synchronously).
close() leaves the group promptly (heartbeat at epoch -1) after revoking and committing.

Not thread-safe, as Kafka's: one thread polls. `close()` may be called from another thread.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import grpc

from logbroker.client.call_errors import rpc_error
from logbroker.client.coordinator import CoordinatorClient, Heartbeater
from logbroker.client.group_member import ASSIGNORS, GroupMember, MemberState
from logbroker.client.metadata_cache import LogThrottle, MetadataCache, metadata_for
from logbroker.client.waker import Waker
from logbroker.errors import (
    BrokerError,
    BrokerUnavailableError,
    InvalidGroupIdError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    LogbrokerError,
    OffsetOutOfRangeError,
    StaleMemberEpochError,
    UnknownMemberIdError,
    UnknownTopicOrPartitionError,
    error_for,
)
from logbroker.storage.record_batch import BatchHeader, Message, decode_batch, iter_batches
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

# Fetches in flight to one broker, over disjoint partitions. A second one lets a partition that just
# became fetchable go out while the first long-polls on caught-up partitions for fetch_max_wait_ms.
FETCHES_IN_FLIGHT_PER_BROKER = 2
# Fetches go on the record transport (logbroker/wire.py), or the broker's FetchStream without one
# (a message instead of a call: ~0.2 ms less per round trip), while responses are small, i.e. the
# consumer is tailing. After a response of at least this many
# bytes the next fetch is a unary call: the sync stream's requests are written by gRPC's own
# thread, which waits for the GIL while poll() decodes the big response (up to the 5 ms switch
# interval; measured before the C decoder: max-100b consume 1.30 M rec/s on streams vs 1.46 M
# unary), whereas a unary call is started by the polling thread itself.
STREAM_FETCH_RESPONSE_BYTES_MAX = 64 << 10
# Responses below this (record bytes) mean the consumer is tailing: see _collect_and_send.
TAIL_RESPONSE_BYTES_MAX = 64 << 10

# Asynchronous commits in flight at once; one more waits for the oldest to finish.
ASYNC_COMMITS_MAX = 16
# close() waits at most this long for the coordinator to answer the leave heartbeat.
LEAVE_WAIT_S_MAX = 5.0

EARLIEST = -2
LATEST = -1
TopicPartition = tuple[str, int]
RebalanceCallback = Callable[[set[TopicPartition]], None]
CommitCallback = Callable[[dict[TopicPartition, int], BaseException | None], None]


class _PartitionState:
    __slots__ = ("topic", "partition", "position", "fetch_offset", "epoch", "leader", "in_flight",
                 "retry_at", "buffered", "high_watermark", "log_start_offset", "log_end_offset",
                 "reset_to", "committed")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.position: int | None = None
        self.fetch_offset = -1
        self.epoch = 0
        self.leader: str | None = None
        self.in_flight = False
        self.retry_at = 0.0
        self.buffered = 0  # undecoded chunks of the current epoch
        self.high_watermark = -1
        self.log_start_offset = -1
        self.log_end_offset = -1
        self.reset_to: int | None = None  # EARLIEST/LATEST: look the offset up instead of the committed one
        self.committed = -1  # last offset this consumer committed (or found committed)

    def seek(self, offset: int) -> None:
        self.position = offset
        self.fetch_offset = offset
        self.epoch += 1
        self.buffered = 0
        self.reset_to = None


class _Chunk:
    """One partition's records from one fetch response, decoded one batch at a time."""

    __slots__ = ("state", "epoch", "data", "batches", "next_batch", "messages", "next_message",
                 "start_offset", "next_offset", "size")

    def __init__(self, state: _PartitionState, data: bytes, batches: list[tuple[BatchHeader, int]],
                 start_offset: int) -> None:
        self.state = state
        self.epoch = state.epoch
        self.data = data
        self.batches = batches
        self.next_batch = 0
        self.messages: list[Message] = []
        self.next_message = 0
        self.start_offset = start_offset
        h = batches[-1][0]
        self.next_offset = h.base_offset + h.last_offset_delta + 1
        self.size = len(data)

    def take(self, n: int) -> list[Message]:
        """Up to n decoded messages (fewer at the end of a batch; [] when exhausted)."""
        while self.next_message >= len(self.messages):
            if self.next_batch >= len(self.batches):
                return []
            h, pos = self.batches[self.next_batch]
            self.next_batch += 1
            st = self.state
            self.messages = decode_batch(self.data, pos, h, st.topic, st.partition, self.start_offset)
            self.next_message = 0
        i = self.next_message
        if i == 0 and n >= len(self.messages):
            out = self.messages  # the whole batch: hand the list over, keep no reference to it
            self.messages = []
            self.next_message = 0
            return out
        out = self.messages[i : i + n]
        self.next_message = i + len(out)
        return out

    def exhausted(self) -> bool:
        return self.next_message >= len(self.messages) and self.next_batch >= len(self.batches)


class _FetchCall(NamedTuple):
    address: str
    future: Any  # grpc.Future
    parts: dict[TopicPartition, tuple[_PartitionState, int, int]]  # -> (state, epoch, fetch_offset)
    lane: int  # which of the broker's fetch streams carries it


class _AsyncCommit(NamedTuple):
    address: str
    future: Any  # grpc.Future of an OffsetCommitResponse
    offsets: dict[TopicPartition, int]
    callback: CommitCallback | None
    auto: bool  # an auto-commit: failures are logged, not handed to a callback


def parse_reset(auto_offset_reset: str) -> int | None:
    if auto_offset_reset in ("earliest", "smallest", "beginning"):
        return EARLIEST
    if auto_offset_reset in ("latest", "largest", "end"):
        return LATEST
    if auto_offset_reset == "none":
        return None
    raise ValueError(f"auto_offset_reset must be 'earliest', 'latest' or 'none', not {auto_offset_reset!r}")


class Consumer:
    """Reads records from assigned (or subscribed) topic partitions, alone or as a group member."""

    def __init__(
        self,
        bootstrap: str | Sequence[str] | MetadataCache,
        topics: Iterable[str] | None = None,
        group: str | None = None,
        *,
        pattern: str | None = None,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
        assignor: str = "sticky",
        session_timeout_ms: int = 0,
        rebalance_timeout_ms: int = 0,
        auto_offset_reset: str = "earliest",
        fetch_max_bytes: int = 8 << 20,
        fetch_max_wait_ms: int = 500,
        fetch_min_bytes: int = 1,
        max_partition_fetch_bytes: int = 4 << 20,
        max_poll_records: int = 500,
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = 5_000,
        request_timeout_ms: int = 30_000,
        retry_backoff_ms: int = 100,
        metadata_max_age_ms: int = 300_000,
        transport: str = "tcp",
    ) -> None:
        """`on_assign(partitions)` / `on_revoke(partitions)` run inside poll() (group members only):
        on_revoke before partitions are given up (positions still readable, commits still accepted),
        on_assign after new ones are taken (seek() works there). `on_lost` (default: on_revoke) runs
        when the member was fenced and its partitions are already someone else's: do not commit.
        `assignor` ("range", "roundrobin", "sticky"), `session_timeout_ms` and `rebalance_timeout_ms`
        (0: the broker's defaults) are used by the coordinator when this member creates the group.
        """
        if fetch_max_bytes <= 0 or max_partition_fetch_bytes <= 0 or fetch_min_bytes < 0:
            raise ValueError("fetch sizes must be positive")
        if fetch_max_bytes > (48 << 20):
            raise ValueError("fetch_max_bytes above 48 MiB does not fit the 64 MiB message limit")
        if fetch_max_wait_ms < 0 or max_poll_records <= 0 or auto_commit_interval_ms <= 0:
            raise ValueError("fetch_max_wait_ms, max_poll_records and auto_commit_interval_ms must be positive")
        if group is not None and not group:
            raise InvalidGroupIdError("group must be a non-empty string (or None for no group)")
        if assignor not in ASSIGNORS:
            raise ValueError(f"assignor must be one of {', '.join(ASSIGNORS)}, not {assignor!r}")
        if session_timeout_ms < 0 or rebalance_timeout_ms < 0:
            raise ValueError("session_timeout_ms and rebalance_timeout_ms must be >= 0 (0: the broker's default)")
        if pattern is not None:
            _compile(pattern)  # before any channel is opened
        self._reset = parse_reset(auto_offset_reset)
        self._auto_offset_reset = auto_offset_reset
        self._fetch_max_bytes = fetch_max_bytes
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._fetch_min_bytes = fetch_min_bytes
        self._partition_max_bytes = max_partition_fetch_bytes
        self._max_poll_records = max_poll_records
        self._group = group
        self._auto_commit = enable_auto_commit and group is not None
        self._auto_commit_interval_s = auto_commit_interval_ms / 1000
        self._request_timeout_s = request_timeout_ms / 1000
        self._fetch_timeout_s = (fetch_max_wait_ms + request_timeout_ms) / 1000
        self._retry_backoff_s = retry_backoff_ms / 1000
        self._retry_backoff_ms = retry_backoff_ms
        self._metadata_max_age_s = metadata_max_age_ms / 1000
        self._metadata, self._owns_metadata = metadata_for(bootstrap, request_timeout_ms, retry_backoff_ms,
                                                           transport)
        # ours, even on a shared cache (long polls hold them); record-transport fetches are read by
        # the polling thread itself (inline), not handed over by a reader thread
        self._streams = self._metadata.client_streams(inline=True)

        self._assigned: dict[TopicPartition, _PartitionState] = {}
        self._subscription: list[str] | None = None
        self._pattern: re.Pattern[str] | None = None
        self._chunks: deque[_Chunk] = deque()
        self._buffered_bytes = 0
        self._in_flight: list[_FetchCall] = []
        self._last_fetch_bytes: dict[str, int] = {}  # per broker: record bytes in its last response
        self._in_flight_per_broker: dict[str, int] = {}
        self._rotation = 0
        self._wakeup = Waker()  # an Event that also wakes on the inline fetch connections' sockets
        self._poll_lock = threading.Lock()
        self._poll_thread: int | None = None  # the thread inside poll() (a callback may call close())
        self._closed = False
        self._need_positions = False
        self._metadata_stale = False
        self._metadata_retry_at = 0.0
        self._next_auto_commit = time.monotonic() + self._auto_commit_interval_s
        self._pending_error: BaseException | None = None
        self._log = LogThrottle(log)

        # The group: the coordinator (with a group), and the membership (once subscribed with one).
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self._assignor = assignor
        self._session_timeout_ms = session_timeout_ms
        self._rebalance_timeout_ms = rebalance_timeout_ms
        self._coordinator = (
            None if group is None
            else CoordinatorClient(self._metadata, group, self._request_timeout_s, self._retry_backoff_s)
        )
        self._member: GroupMember | None = None
        self._member_lock = threading.Lock()
        self._heartbeater: Heartbeater | None = None
        self._group_managed = False  # the assignment is the group member's (subscribed with a group)
        self._member_changed = False  # set by the heartbeat thread: poll() has membership changes to apply
        self._left = threading.Event()
        self._async_commits: deque[_AsyncCommit] = deque()

        topic_list = [] if topics is None else [topics] if isinstance(topics, str) else list(topics)
        if topic_list or pattern is not None:
            self.subscribe(topic_list, pattern=pattern)

    # -- the group ---------------------------------------------------------------------------

    @property
    def member_id(self) -> str:
        """This consumer's id in its group ("" when it is not a group member)."""
        return "" if self._member is None or not self._group_managed else self._member.member_id

    @property
    def member_epoch(self) -> int:
        """The member epoch (-1: not a group member; 0: joining)."""
        if self._member is None or not self._group_managed:
            return -1
        with self._member_lock:
            return self._member.member_epoch

    @property
    def group_state(self) -> str:
        """The membership state: unsubscribed, joining, stable, reconciling, fenced, leaving, fatal."""
        if self._member is None or not self._group_managed:
            return MemberState.UNSUBSCRIBED.value
        with self._member_lock:
            return self._member.state.value

    def _join(self, topics: list[str], pattern: str) -> None:
        """Subscribe as a group member (creating the membership and its heartbeat thread once)."""
        assert self._group is not None and self._coordinator is not None
        if self._member is None:
            self._member = GroupMember(
                self._group, uuid.uuid4().hex, assignor=self._assignor, session_timeout_ms=self._session_timeout_ms,
                rebalance_timeout_ms=self._rebalance_timeout_ms, retry_backoff_ms=self._retry_backoff_ms,
                rng=random.Random(),  # jitter on the heartbeat backoff
            )
            self._heartbeater = Heartbeater(
                self._member, self._member_lock, self._coordinator, self._metadata, self._on_member_change,
                self._request_timeout_s, self._session_timeout_ms,
            )
            self._heartbeater.start()
        with self._member_lock:
            self._member.subscribe(topics, pattern, _now_ms())
            self._left.clear()
        self._wake_heartbeat()

    def _on_member_change(self) -> None:
        """Heartbeat thread: wake the polling thread when there is something to apply."""
        member = self._member
        assert member is not None
        with self._member_lock:
            state = member.state
            pending = state is MemberState.FATAL or member.reconciliation() is not None
        if state is MemberState.UNSUBSCRIBED:
            self._left.set()
        if pending:
            self._member_changed = True
            self._wakeup.set()

    def _wake_heartbeat(self) -> None:
        if self._heartbeater is not None:
            self._heartbeater.wake()

    def _apply_membership(self) -> None:
        """Polling thread: revoke, then assign, as the member's latest assignment says; callbacks run here."""
        self._member_changed = False
        member = self._member
        if member is None or not self._group_managed:
            return
        with self._member_lock:
            rec = member.reconciliation()
            fatal = member.error if member.state is MemberState.FATAL else None
        if fatal is not None:
            self._member_changed = True  # raised by every poll() until subscribe() is called again
            raise fatal
        if rec is None:
            return
        error: BaseException | None = None
        if rec.revoke:
            error = self._revoke(set(rec.revoke), lost=rec.lost, commit=self._auto_commit and not rec.lost)
        if rec.assign or rec.joined:
            with self._member_lock:
                taken = member.assigned(rec.assign, _now_ms())
            if taken:
                unknown = sorted({t for t, p in taken if (self._metadata.cached_partitions(t) or 0) <= p})
                if unknown:  # leaders of topics this consumer has not seen yet (one attempt: poll() retries)
                    with contextlib.suppress(LogbrokerError):
                        self._metadata.refresh(unknown, retry=False)
                self._set_assignment(list(self._assigned) + sorted(taken), commit_revoked=False)
                self._wake_heartbeat()
            log.info("group %s: member %s assigned %s", self._group, member.member_id, _describe(taken))
            if self._on_assign is not None:
                try:
                    self._on_assign(set(taken))
                except Exception as e:
                    log.exception("on_assign of group %s raised", self._group)
                    error = error or e
        if error is not None:
            raise error

    def _revoke(self, partitions: set[TopicPartition], lost: bool, commit: bool) -> BaseException | None:
        """Give partitions up: callback, commit, drop their records, tell the member. Returns the
        callback's exception (the revocation completes regardless)."""
        member = self._member
        assert member is not None
        error: BaseException | None = None
        callback = (self._on_lost or self._on_revoke) if lost else self._on_revoke
        log.info("group %s: member %s %s %s", self._group, member.member_id, "lost" if lost else "revoking",
                 _describe(partitions))
        if callback is not None:
            try:
                callback(set(partitions))
            except Exception as e:
                log.exception("%s of group %s raised", "on_lost" if lost else "on_revoke", self._group)
                error = e
        if commit:
            self._commit_quietly([st for tp, st in self._assigned.items() if tp in partitions], asynchronous=False)
        self._set_assignment([tp for tp in self._assigned if tp not in partitions], commit_revoked=False)
        with self._member_lock:
            member.revoked(partitions, _now_ms())
        self._wake_heartbeat()
        return error

    def _leave_group(self, commit: bool) -> None:
        """Polling thread: give up everything (callbacks, commit) and leave; the heartbeat thread sends it."""
        member = self._member
        assert member is not None
        with self._member_lock:
            owned = set(member.owned)
            lost = member.state is MemberState.FENCED
        error = self._revoke(owned, lost=lost, commit=commit and not lost) if owned else None
        if self._assigned:
            self._set_assignment([], commit_revoked=False)
        with self._member_lock:
            member.leave(_now_ms())
            if member.state is MemberState.UNSUBSCRIBED:
                self._left.set()
        self._group_managed = False
        self._member_changed = False
        self._wake_heartbeat()
        if error is not None:
            log.warning("group %s: leaving despite the callback's error: %s", self._group, error)

    def _await_leave(self, deadline: float) -> None:
        member = self._member
        if member is None:
            return
        if not self._left.wait(max(min(deadline - time.monotonic(), LEAVE_WAIT_S_MAX), 0)):
            with self._member_lock:
                member.abandon()
            self._log.warning("leave", "group %s: the coordinator did not answer the leave in time: the "
                              "session timeout will evict member %s", self._group, member.member_id)

    # -- assignment --------------------------------------------------------------------------

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read exactly these partitions (replaces any subscription; a group member leaves its group)."""
        wanted = [(str(t), int(p)) for t, p in partitions]
        for t, p in wanted:
            if p < 0:
                raise ValueError(f"partition must be >= 0, got {t}-{p}")
        if self._group_managed:
            self.unsubscribe()
        self._subscription = None
        self._pattern = None
        unknown = sorted({t for t, _ in wanted if self._metadata.cached_partitions(t) is None})
        if unknown:
            with contextlib.suppress(LogbrokerError):  # poll() retries; assign() itself never fails on it
                self._metadata.refresh(unknown, retry=False)
        self._set_assignment(wanted)

    def subscribe(self, topics: Iterable[str] | None = None, pattern: str | None = None) -> None:
        """Read the partitions of these topics and/or of every topic whose whole name matches `pattern`.

        With a group: join it (the coordinator assigns a share of the partitions; topics created later
        that match the pattern are picked up). Without: every partition (partition counts, and topics
        matching the pattern, are re-read on metadata refreshes).
        """
        topic_list = [] if topics is None else [topics] if isinstance(topics, str) else list(dict.fromkeys(topics))
        if not topic_list and pattern is None:
            raise ValueError("subscribe() needs at least one topic or a pattern (use unsubscribe() to stop)")
        compiled = None if pattern is None else _compile(pattern)
        if self._group is not None:
            if not self._group_managed and self._assigned:
                self._set_assignment([])  # a manual assignment ends
            self._subscription, self._pattern = topic_list, compiled
            self._group_managed = True
            self._join(topic_list, pattern or "")
            return
        self._subscription, self._pattern = topic_list, compiled
        self._refresh_metadata(force=True)

    def unsubscribe(self) -> None:
        """Stop reading; a group member gives up its partitions (on_revoke, commit) and leaves the group."""
        if self._group_managed:
            self._leave_group(commit=self._auto_commit)
        self._subscription = None
        self._pattern = None
        self._set_assignment([])

    def subscription(self) -> list[str] | None:
        if self._subscription is None and self._pattern is None:
            return None
        return list(self._subscription or ())

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def _subscribed(self) -> bool:
        return self._subscription is not None or self._pattern is not None

    def _set_assignment(self, wanted: list[TopicPartition], commit_revoked: bool = True) -> None:
        old = self._assigned
        keep = set(wanted)
        revoked = [tp for tp in old if tp not in keep]
        if revoked and commit_revoked and self._auto_commit:
            self._commit_quietly([old[tp] for tp in revoked], asynchronous=False)
        new: dict[TopicPartition, _PartitionState] = {}
        for tp in wanted:
            st = old.get(tp)
            if st is None:
                st = _PartitionState(*tp)
                self._need_positions = True
            new[tp] = st
        for tp in revoked:
            old[tp].epoch += 1  # drops its buffered chunks and in-flight results
        self._assigned = new
        self._update_leaders()

    # -- positions ---------------------------------------------------------------------------

    def _state(self, topic: str, partition: int) -> _PartitionState:
        st = self._assigned.get((topic, partition))
        if st is None:
            raise LogbrokerError(f"{topic}-{partition} is not assigned to this consumer")
        return st

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """The next poll() returns records of this partition from `offset` on."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._state(topic, partition).seek(offset)

    def seek_to_beginning(self, topic: str | None = None, partition: int | None = None) -> None:
        """Seek to the log start offset: of one partition, of a topic's assigned partitions, or of all."""
        self._seek_to(self._select(topic, partition), EARLIEST)

    def seek_to_end(self, topic: str | None = None, partition: int | None = None) -> None:
        """Seek to the high watermark (only records produced from now on will be read)."""
        self._seek_to(self._select(topic, partition), LATEST)

    def _select(self, topic: str | None, partition: int | None) -> list[_PartitionState]:
        if topic is None:
            return list(self._assigned.values())
        if partition is None:
            return [st for (t, _), st in self._assigned.items() if t == topic]
        return [self._state(topic, partition)]

    def _seek_to(self, states: list[_PartitionState], timestamp: int) -> None:
        offsets = self._list_offsets(states, timestamp, deadline=time.monotonic() + self._request_timeout_s)
        for st in states:
            st.seek(offsets[(st.topic, st.partition)])

    def position(self, topic: str, partition: int) -> int:
        """Offset of the next record poll() returns for this partition (looked up if not known yet).

        Raises KafkaTimeoutError when no start offset is found within request_timeout_ms.
        """
        st = self._state(topic, partition)
        deadline = time.monotonic() + self._request_timeout_s
        while st.position is None:
            now = time.monotonic()
            st.retry_at = min(st.retry_at, now)
            self._initialize_positions(now)
            if st.position is not None:
                break
            if time.monotonic() + self._retry_backoff_s >= deadline:
                raise KafkaTimeoutError(f"no start offset found for {topic}-{partition} within request_timeout_ms")
            time.sleep(self._retry_backoff_s)
            self._refresh_metadata(force=False)
        return st.position

    def highwater(self, topic: str, partition: int) -> int:
        """The high watermark seen in the last fetch response (-1 before the first)."""
        return self._state(topic, partition).high_watermark

    def _initialize_positions(self, now: float) -> None:
        """Positions for partitions without one: committed offset (with a group), else reset.

        Partitions whose lookup fails with a retriable error back off for retry_backoff_ms.
        """
        missing = [st for st in self._assigned.values() if st.position is None and st.retry_at <= now]
        if missing:
            try:
                self._initialize(missing, deadline=now)  # one attempt: poll() must not block on it
            except (BrokerError, BrokerUnavailableError) as e:
                if not getattr(e, "retriable", False):
                    raise
                self._log.warning("offsets", "looking up start offsets failed: %s", e)
                for st in missing:
                    st.retry_at = time.monotonic() + self._retry_backoff_s
                self._metadata_stale = True
        self._need_positions = any(st.position is None for st in self._assigned.values())

    def _initialize(self, missing: list[_PartitionState], deadline: float) -> None:
        if self._group is not None:
            fresh = [st for st in missing if st.reset_to is None]
            if fresh:
                committed = self._offset_fetch([(st.topic, st.partition) for st in fresh], deadline)
                for st in fresh:
                    off = committed.get((st.topic, st.partition), -1)
                    if off >= 0:
                        st.seek(off)
                        st.committed = off
        by_reset: dict[int, list[_PartitionState]] = {}
        for st in missing:
            if st.position is not None:
                continue
            strategy = st.reset_to if st.reset_to is not None else self._reset
            if strategy is None:
                raise OffsetOutOfRangeError(
                    f"{st.topic}-{st.partition} has no committed offset and auto_offset_reset is 'none'"
                )
            by_reset.setdefault(strategy, []).append(st)
        for strategy, states in by_reset.items():
            offsets = self._list_offsets(states, strategy, deadline)
            for st in states:
                st.seek(offsets[(st.topic, st.partition)])

    def _list_offsets(self, states: list[_PartitionState], timestamp: int, deadline: float) -> dict[TopicPartition, int]:
        """ListOffsets to each partition's leader; retries retriable errors until `deadline`."""
        out: dict[TopicPartition, int] = {}
        todo = list(states)
        while todo:
            by_leader: dict[str, list[_PartitionState]] = {}
            retry: list[_PartitionState] = []
            last: BaseException | None = None
            for st in todo:
                try:
                    leader = self._metadata.leader(st.topic, st.partition)
                except UnknownTopicOrPartitionError as e:
                    leader, last = None, e
                if leader is None:
                    last = last or LeaderNotAvailableError(f"{st.topic}-{st.partition} has no leader")
                    retry.append(st)
                    continue
                by_leader.setdefault(leader, []).append(st)
            for address, group in by_leader.items():
                request = pb.ListOffsetsRequest(partitions=[
                    pb.ListOffsetsPartition(topic=st.topic, partition=st.partition, timestamp=timestamp)
                    for st in group
                ])
                try:
                    resp = self._metadata.broker_stub(address).ListOffsets(request, timeout=self._request_timeout_s)
                except grpc.RpcError as e:
                    err = rpc_error(e)
                    if not getattr(err, "retriable", False):
                        raise err from None
                    last = err
                    retry.extend(group)
                    continue
                results = {(r.topic, r.partition): r for r in resp.results}
                for st in group:
                    r = results.get((st.topic, st.partition))
                    if r is None:
                        retry.append(st)
                        continue
                    if r.error_code != pb.NONE:
                        err = error_for(r.error_code, r.error_message)
                        if not err.retriable:
                            raise err
                        last = err
                        retry.append(st)
                        continue
                    out[(st.topic, st.partition)] = max(r.offset, 0)
            todo = retry
            if todo:
                if time.monotonic() + self._retry_backoff_s >= deadline:
                    raise last if last is not None else BrokerUnavailableError("ListOffsets found no offset")
                time.sleep(self._retry_backoff_s)
                with contextlib.suppress(LogbrokerError):
                    self._metadata.refresh([st.topic for st in todo], retry=False)
        return out

    # -- poll --------------------------------------------------------------------------------

    def poll(self, timeout_ms: int | None = None, max_records: int | None = None) -> list[Message]:
        """Records from the assigned partitions, in offset order per partition.

        Waits up to `timeout_ms` (None: until there are records or the consumer is closed) and
        returns at most `max_records` (default: max_poll_records). Returns [] on timeout.
        """
        if self._closed:
            raise LogbrokerError("poll() on a closed consumer")
        if not self._subscribed() and not self._assigned:
            raise LogbrokerError("poll() needs subscribe() or assign() first")
        limit = max_records if max_records is not None else self._max_poll_records
        if limit <= 0:
            raise ValueError("max_records must be positive")
        return self._poll(timeout_ms, limit)

    def _poll(self, timeout_ms: int | None, limit: int) -> list[Message]:
        """poll() without the argument checks; [] once the consumer is closed."""
        deadline = None if timeout_ms is None else time.monotonic() + max(timeout_ms, 0) / 1000
        with self._poll_lock:
            self._poll_thread = threading.get_ident()
            try:
                return self._poll_locked(deadline, limit)
            finally:
                self._poll_thread = None

    def _poll_locked(self, deadline: float | None, limit: int) -> list[Message]:
        pumped = False  # the inline connections were read once without waiting (a poll past its deadline)
        while True:
            if self._closed:
                return []
            if self._member_changed:  # before any record: none may follow on_revoke of its partition
                self._apply_membership()
                if self._closed:  # by a callback
                    return []
            # Records already decoded go out first: no RPC bookkeeping on the hot path.
            chunks = self._chunks
            if chunks:
                head = chunks[0]
                if head.next_message < len(head.messages) and head.epoch == head.state.epoch:
                    out = head.take(limit)
                    head.state.position = out[-1].offset + 1
                    if len(out) == limit and self._in_flight:
                        return out
                    # the next fetch goes out while these records are used (it was deferred after a
                    # small response, or completes now)
                    self._collect_and_send(time.monotonic())
                    return out
            now = time.monotonic()
            self._wakeup.clear()
            self._housekeeping(now)
            deferred = self._collect_and_send(now, defer_after_small=True)
            if self._pending_error is not None:
                if deferred:
                    self._collect_and_send(now)
                err, self._pending_error = self._pending_error, None
                raise err
            out = self._drain(limit)
            if out:
                if not deferred:  # else the next poll() sends the next fetch
                    self._collect_and_send(time.monotonic())
                return out
            if deferred:
                self._collect_and_send(time.monotonic())
            if self._chunks:
                continue  # only control batches or skipped records: go on decoding
            wait = self._wait_time(now, deadline)
            inline = [c.future.connection for c in self._in_flight
                      if getattr(c.future, "connection", None) is not None and not c.future.done()]
            if (wait is not None and wait <= 0) or self._closed:
                if inline and not self._closed and not pumped:  # poll(0): read what has come, once
                    pumped = True
                    for conn in inline:
                        conn.pump()
                    if any(c.future.done() for c in self._in_flight):
                        continue
                return []
            if any(c.future.done() for c in self._in_flight):
                continue  # completed on this thread (by pump(), or at once when sent), which sets no _wakeup
            for conn in self._wakeup.wait(wait, inline):
                conn.pump()  # completes its fetches here

    def _wait_time(self, now: float, deadline: float | None) -> float | None:
        """Seconds to sleep: until the deadline, the next retry or commit; None: until woken."""
        wake = deadline
        for st in self._assigned.values():
            if st.retry_at > now and (not st.in_flight) and (wake is None or st.retry_at < wake):
                wake = st.retry_at
        if self._auto_commit and (wake is None or self._next_auto_commit < wake):
            wake = self._next_auto_commit
        if (self._metadata_stale or self._missing_topics()) and (wake is None or self._metadata_retry_at < wake):
            wake = max(self._metadata_retry_at, now + self._retry_backoff_s)
        if not self._in_flight and self._assigned and wake is None:
            wake = now + self._retry_backoff_s  # nothing in flight to wake us: look again soon
        return None if wake is None else wake - now

    def _missing_topics(self) -> bool:
        """A subscription without a group that may gain topics: refresh metadata every second."""
        if self._group_managed or not self._subscribed():
            return False
        if self._pattern is not None:
            return True  # topics created later that match
        have = {t for t, _ in self._assigned}
        return any(t not in have for t in self._subscription or ())

    def _housekeeping(self, now: float) -> None:
        if self._async_commits:
            self._finish_async_commits(block_until=None)
        if self._auto_commit and now >= self._next_auto_commit:
            self._next_auto_commit = now + self._auto_commit_interval_s
            if not any(c.auto for c in self._async_commits):  # the last one is still on its way
                self._commit_quietly(list(self._assigned.values()), asynchronous=True)
        due = now >= self._metadata.last_refresh_monotonic + self._metadata_max_age_s
        if self._missing_topics():
            due = due or now >= self._metadata.last_refresh_monotonic + 1.0
        if (due or self._metadata_stale) and now >= self._metadata_retry_at:
            self._refresh_metadata(force=False)
        if self._need_positions:
            self._initialize_positions(now)

    def _drain(self, limit: int) -> list[Message]:
        out: list[Message] = []
        chunks = self._chunks
        while chunks and len(out) < limit:
            chunk = chunks[0]
            st = chunk.state
            if chunk.epoch != st.epoch:
                chunks.popleft()
                self._buffered_bytes -= chunk.size
                continue
            try:
                msgs = chunk.take(limit - len(out))
            except LogbrokerError:
                # A corrupt batch: drop what follows it, so the next fetch starts at it again.
                chunks.popleft()
                self._buffered_bytes -= chunk.size
                st.buffered -= 1
                st.seek(st.position if st.position is not None else chunk.start_offset)
                raise
            if msgs:
                st.position = msgs[-1].offset + 1
                if out:
                    out.extend(msgs)
                else:
                    out = msgs
                    if len(out) >= limit:
                        break
                continue
            # exhausted: the position moves past control batches and compacted gaps too
            chunks.popleft()
            self._buffered_bytes -= chunk.size
            st.buffered -= 1
            if st.position is None or st.position < chunk.next_offset:
                st.position = chunk.next_offset
        return out

    # -- fetching ----------------------------------------------------------------------------

    def _collect_and_send(self, now: float, defer_after_small: bool = False) -> bool:
        """Take in the finished fetches, then send the next ones.

        With `defer_after_small`, when every response taken in was small (a consumer tailing the
        log), send nothing and return True: the caller hands out the records first and sends later,
        so building and writing the next request is not on those records' way to the user. After a
        big response the next fetch goes out at once, to overlap the broker's work with the decode.
        """
        handled_bytes = -1
        if self._in_flight:
            for call in [c for c in self._in_flight if c.future.done()]:
                self._in_flight.remove(call)
                self._in_flight_per_broker[call.address] -= 1
                self._handle_fetch(call, now)
                handled_bytes = max(handled_bytes, 0) + self._last_fetch_bytes.get(call.address, 0)
        if defer_after_small and 0 <= handled_bytes < TAIL_RESPONSE_BYTES_MAX:
            return True
        if self._closed or self._buffered_bytes > 2 * self._fetch_max_bytes:
            return False
        by_leader: dict[str, list[_PartitionState]] = {}
        for st in self._assigned.values():
            if (
                st.in_flight
                or st.position is None
                or st.buffered > 1
                or st.retry_at > now
                or st.leader is None
                or self._in_flight_per_broker.get(st.leader, 0) >= FETCHES_IN_FLIGHT_PER_BROKER
            ):
                if st.leader is None and st.position is not None:
                    self._metadata_stale = True
                continue
            by_leader.setdefault(st.leader, []).append(st)
        for address, states in by_leader.items():
            self._send_fetch(address, states)
        return False

    def _send_fetch(self, address: str, states: list[_PartitionState]) -> None:
        parts: dict[TopicPartition, tuple[_PartitionState, int, int]] = {}
        if len(states) > 1:  # rotate, so the broker's max_bytes cut-off does not starve the last ones
            k = self._rotation % len(states)
            self._rotation += 1
            states = states[k:] + states[:k]
        request = pb.FetchRequest(
            max_wait_ms=self._fetch_max_wait_ms,
            min_bytes=self._fetch_min_bytes,
            max_bytes=self._fetch_max_bytes,
            replica_id=-1,
        )
        for st in states:
            request.partitions.add(
                topic=st.topic, partition=st.partition, fetch_offset=st.fetch_offset,
                partition_max_bytes=self._partition_max_bytes, current_leader_epoch=-1,
            )
            parts[(st.topic, st.partition)] = (st, st.epoch, st.fetch_offset)
            st.in_flight = True
        try:
            busy = {c.lane for c in self._in_flight if c.address == address}
            lane = next(i for i in range(FETCHES_IN_FLIGHT_PER_BROKER) if i not in busy)
            if self._last_fetch_bytes.get(address, 0) >= STREAM_FETCH_RESPONSE_BYTES_MAX:
                future = self._metadata.broker_stub(address).Fetch.future(request, timeout=self._fetch_timeout_s)
            else:
                future = self._metadata.fetch_call(address, request, self._fetch_timeout_s, lane, self._streams)
        except Exception as e:
            for st in states:
                st.in_flight = False
                st.retry_at = time.monotonic() + self._retry_backoff_s
            self._metadata_stale = True
            self._log.warning(f"fetch {address}", "Fetch to %s could not start: %s", address, e)
            return
        self._in_flight.append(_FetchCall(address, future, parts, lane))
        self._in_flight_per_broker[address] = self._in_flight_per_broker.get(address, 0) + 1
        future.add_done_callback(self._on_fetch_done)

    def _on_fetch_done(self, _future: object) -> None:
        if threading.get_ident() != self._poll_thread:  # the poll thread looks at done fetches before it waits
            self._wakeup.set()

    def _handle_fetch(self, call: _FetchCall, now: float) -> None:
        for st, _, _ in call.parts.values():
            st.in_flight = False
        try:
            response = call.future.result()
        except grpc.RpcError as e:
            err = rpc_error(e)
            if e.code() == grpc.StatusCode.CANCELLED and self._closed:
                return
            self._log.warning(f"fetch {call.address}", "Fetch from %s failed: %s", call.address, err)
            for st, _, _ in call.parts.values():
                st.retry_at = now + self._retry_backoff_s
            self._metadata_stale = True
            if not getattr(err, "retriable", False):
                self._pending_error = err
            return
        self._last_fetch_bytes[call.address] = 0
        for r in response.results:
            entry = call.parts.get((r.topic, r.partition))
            if entry is None:
                continue
            st, epoch, fetch_offset = entry
            if epoch != st.epoch or self._assigned.get((st.topic, st.partition)) is not st:
                continue  # sought or unassigned meanwhile
            code = r.error_code
            if code == pb.NONE:
                st.high_watermark = r.high_watermark
                st.log_start_offset = r.log_start_offset
                st.log_end_offset = r.log_end_offset
                data = r.records  # one copy out of the message; never copied again
                self._last_fetch_bytes[call.address] += len(data)
                if not data:
                    continue
                try:
                    batches = list(iter_batches(data))
                except LogbrokerError as e:
                    self._pending_error = e
                    st.retry_at = now + self._retry_backoff_s
                    continue
                if not batches:
                    continue
                chunk = _Chunk(st, data, batches, fetch_offset)
                if chunk.next_offset <= fetch_offset:
                    continue  # only records below the fetch offset: nothing new
                self._chunks.append(chunk)
                self._buffered_bytes += chunk.size
                st.buffered += 1
                st.fetch_offset = chunk.next_offset
            elif code == pb.OFFSET_OUT_OF_RANGE:
                self._handle_out_of_range(st, fetch_offset, r)
            else:
                err = error_for(code, r.error_message)
                st.retry_at = now + self._retry_backoff_s
                if err.refresh_metadata:
                    self._metadata_stale = True
                if not err.retriable:
                    self._pending_error = err
                else:
                    log.debug("Fetch %s-%s: %s", st.topic, st.partition, err)

    def _handle_out_of_range(self, st: _PartitionState, fetch_offset: int, r: pb.FetchPartitionResult) -> None:
        if self._reset is None:
            self._pending_error = OffsetOutOfRangeError(
                f"{st.topic}-{st.partition}: offset {fetch_offset} is out of range "
                f"[{r.log_start_offset}, {r.high_watermark}] and auto_offset_reset is 'none'"
            )
            st.retry_at = time.monotonic() + self._retry_backoff_s
            return
        log.info("%s-%s: offset %d out of range, resetting to %s", st.topic, st.partition, fetch_offset,
                 self._auto_offset_reset)
        st.epoch += 1
        st.buffered = 0
        st.position = None
        st.reset_to = self._reset
        self._need_positions = True

    # -- metadata ----------------------------------------------------------------------------

    def _refresh_metadata(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now < self._metadata_retry_at:
            return
        self._metadata_retry_at = now + self._retry_backoff_s
        standalone = self._subscribed() and not self._group_managed  # every partition of the subscription
        topics = {t for t, _ in self._assigned}
        if standalone:
            topics |= set(self._subscription or ())
        every_topic = standalone and self._pattern is not None
        if topics or every_topic:
            try:
                self._metadata.refresh(None if every_topic else sorted(topics), retry=force)
            except LogbrokerError as e:
                self._log.warning("metadata", "metadata refresh failed: %s", e)
                return  # subscribed topics get assigned once a refresh succeeds
        self._metadata_stale = False
        if standalone:
            names = list(self._subscription or ())
            if self._pattern is not None:
                pattern = self._pattern
                names += sorted(t for t in self._metadata.topics() if pattern.fullmatch(t) and not t.startswith("__") and t not in names)
            wanted: list[TopicPartition] = []
            for t in names:
                n = self._metadata.cached_partitions(t)
                if n is not None:
                    wanted.extend((t, p) for p in range(n))
            if set(wanted) != set(self._assigned):
                self._set_assignment(wanted)
                return
        self._update_leaders()

    def _update_leaders(self) -> None:
        for st in self._assigned.values():
            try:
                st.leader = self._metadata.leader(st.topic, st.partition)
            except UnknownTopicOrPartitionError:
                st.leader = None

    # -- offsets of the group ----------------------------------------------------------------

    def _require_group(self) -> CoordinatorClient:
        if self._coordinator is None:
            raise InvalidGroupIdError("this consumer has no group: pass group=... to Consumer() to commit offsets")
        return self._coordinator

    def _offset_fetch(self, partitions: list[TopicPartition], deadline: float) -> dict[TopicPartition, int]:
        coordinator = self._require_group()
        request = pb.OffsetFetchRequest(
            group=coordinator.group, partitions=[pb.TopicPartition(topic=t, partition=p) for t, p in partitions]
        )
        resp = coordinator.call("broker", "OffsetFetch", request, deadline)
        if resp.error_code != pb.NONE:
            raise error_for(resp.error_code, resp.error_message)
        out: dict[TopicPartition, int] = {}
        for r in resp.results:
            if r.error_code != pb.NONE:
                err = error_for(r.error_code, r.error_message)
                if not isinstance(err, UnknownTopicOrPartitionError):
                    raise err
                continue
            out[(r.topic, r.partition)] = r.offset
        return out

    def committed(self, topic: str, partition: int) -> int | None:
        """The group's committed offset for the partition, None if nothing is committed."""
        deadline = time.monotonic() + self._request_timeout_s
        off = self._offset_fetch([(topic, partition)], deadline).get((topic, partition), -1)
        return off if off >= 0 else None

    def _commit_identity(self) -> tuple[str, int]:
        """(member id, member epoch) to commit with: the member's, or ("", -1) when not group-managed."""
        member = self._member
        if member is None or not self._group_managed:
            return "", -1
        with self._member_lock:
            identity = member.commit_identity()
            state = member.state
        if identity is None:
            raise UnknownMemberIdError(
                f"not a member of group {self._group} right now ({state.value}): nothing was committed"
            )
        return identity

    def _commit_request(self, offsets: dict[TopicPartition, int]) -> pb.OffsetCommitRequest:
        member_id, epoch = self._commit_identity()
        return pb.OffsetCommitRequest(
            group=self._group, member_id=member_id, member_epoch=epoch,
            partitions=[pb.OffsetCommitPartition(topic=t, partition=p, offset=off) for (t, p), off in offsets.items()],
        )

    def commit(
        self,
        offsets: dict[TopicPartition, int] | None = None,
        asynchronous: bool = False,
        callback: CommitCallback | None = None,
    ) -> None:
        """Commit `offsets` (the next offset to read, per partition), or every current position.

        Synchronous: retries until request_timeout_ms (a stale member epoch too: the heartbeat in
        flight brings the new one), raises the first error. Asynchronous: returns at once;
        `callback(offsets, error_or_None)` runs inside a later poll() (or commit()/close()), in commit
        order. A group member commits as itself: a fenced or joining member cannot commit
        (UnknownMemberIdError), nor one the coordinator no longer knows.
        """
        coordinator = self._require_group()
        if offsets is None:
            offsets = {tp: st.position for tp, st in self._assigned.items() if st.position is not None}
        else:
            offsets = {(str(t), int(p)): int(off) for (t, p), off in offsets.items()}
        if not offsets:
            if callback is not None:
                callback({}, None)
            return
        if asynchronous:
            self._commit_async(coordinator, offsets, callback, auto=False)
            return
        try:
            self._commit_sync(coordinator, offsets, time.monotonic() + self._request_timeout_s)
        except LogbrokerError as e:
            if callback is not None:
                callback(offsets, e)
            raise
        if callback is not None:
            callback(offsets, None)

    def _commit_sync(self, coordinator: CoordinatorClient, offsets: dict[TopicPartition, int], deadline: float) -> None:
        self._finish_async_commits(block_until=deadline)  # never overtake an earlier commit
        while True:
            resp = coordinator.call("broker", "OffsetCommit", self._commit_request(offsets), deadline)
            if resp.error_code == pb.STALE_MEMBER_EPOCH and time.monotonic() + self._retry_backoff_s < deadline:
                time.sleep(self._retry_backoff_s)  # the heartbeat that moved the epoch is on its way back
                continue
            break
        err = self._commit_outcome(offsets, resp)
        if err is not None:
            raise err

    def _commit_outcome(self, offsets: dict[TopicPartition, int], resp: pb.OffsetCommitResponse) -> BrokerError | None:
        """Record what a commit response accepted; the error to report (top-level, else the first)."""
        if resp.error_code != pb.NONE:
            err = error_for(resp.error_code, resp.error_message or f"group {self._group}")
            if isinstance(err, StaleMemberEpochError | UnknownMemberIdError):
                err.message += " (nothing was committed)"
            return err
        first: BrokerError | None = None
        for r in resp.results:
            if r.error_code != pb.NONE:
                first = first or error_for(r.error_code, f"{r.topic}-{r.partition}: {r.error_message}")
                continue
            st = self._assigned.get((r.topic, r.partition))
            if st is not None:
                st.committed = offsets.get((r.topic, r.partition), st.committed)
        return first

    def _commit_async(self, coordinator: CoordinatorClient, offsets: dict[TopicPartition, int],
                      callback: CommitCallback | None, auto: bool) -> None:
        if len(self._async_commits) >= ASYNC_COMMITS_MAX:
            self._finish_async_commits(block_until=time.monotonic() + self._request_timeout_s, at_most=1)
        try:
            request = self._commit_request(offsets)
            address = coordinator.cached_address or coordinator.address(deadline=time.monotonic())  # one lookup
            future = self._metadata.broker_stub(address).OffsetCommit.future(request, timeout=self._request_timeout_s)
        except (LogbrokerError, grpc.RpcError, ValueError) as e:
            err = e if isinstance(e, LogbrokerError) else BrokerUnavailableError(str(e))
            if isinstance(e, grpc.RpcError):
                err = rpc_error(e)
            self._commit_failed(offsets, callback, auto, err)
            return
        self._async_commits.append(_AsyncCommit(address, future, offsets, callback, auto))
        future.add_done_callback(self._on_fetch_done)  # wakes poll()

    def _finish_async_commits(self, block_until: float | None, at_most: int | None = None) -> None:
        """Complete asynchronous commits in order: those done (or, with `block_until`, every one, waiting
        until then at most); their callbacks run here."""
        done = 0
        while self._async_commits and (at_most is None or done < at_most):
            commit = self._async_commits[0]
            if not commit.future.done():
                if block_until is None:
                    return
                with contextlib.suppress(Exception):  # the outcome is read below
                    commit.future.result(timeout=max(block_until - time.monotonic(), 0))
                if not commit.future.done():
                    return
            self._async_commits.popleft()
            done += 1
            try:
                resp = commit.future.result()
            except grpc.RpcError as e:
                self._coordinator_failed(commit.address)
                self._commit_failed(commit.offsets, commit.callback, commit.auto, rpc_error(e))
                continue
            except Exception as e:  # cancelled
                self._commit_failed(commit.offsets, commit.callback, commit.auto, LogbrokerError(f"commit: {e!r}"))
                continue
            if resp.error_code in (pb.NOT_COORDINATOR, pb.COORDINATOR_NOT_AVAILABLE):
                self._coordinator_failed(commit.address)
            err = self._commit_outcome(commit.offsets, resp)
            if err is not None:
                self._commit_failed(commit.offsets, commit.callback, commit.auto, err)
            elif commit.callback is not None:
                commit.callback(commit.offsets, None)

    def _coordinator_failed(self, address: str) -> None:
        if self._coordinator is not None:
            self._coordinator.invalidate(address)

    def _commit_failed(self, offsets: dict[TopicPartition, int], callback: CommitCallback | None, auto: bool,
                       err: LogbrokerError) -> None:
        if callback is not None:
            callback(offsets, err)
        else:
            self._log.warning("commit", "%scommit of group %s failed: %s", "auto-" if auto else "async ",
                              self._group, err)

    def _commit_quietly(self, states: list[_PartitionState], asynchronous: bool) -> None:
        """Auto-commit: positions that moved since the last commit; failures are logged."""
        offsets = {
            (st.topic, st.partition): st.position
            for st in states
            if st.position is not None and st.position != st.committed
        }
        if not offsets or self._coordinator is None:
            return
        if asynchronous:
            self._commit_async(self._coordinator, offsets, None, auto=True)
            return
        try:
            self._commit_sync(self._coordinator, offsets, time.monotonic() + self._request_timeout_s)
        except LogbrokerError as e:
            self._log.warning("commit", "auto-commit of group %s failed: %s", self._group, e)

    # -- lifecycle ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Message]:
        """Every record, forever: ends when the consumer is closed (from another thread)."""
        if not self._subscribed() and not self._assigned:
            raise LogbrokerError("iterating needs subscribe() or assign() first")
        while not self._closed:
            yield from self._poll(None, self._max_poll_records)

    def close(self, timeout: float | None = None) -> None:
        """Commit positions (with a group and auto-commit), leave the group, close the channels. Idempotent.

        A group member runs on_revoke, commits, and sends its leave heartbeat at once (so its partitions
        move without waiting for the session timeout); close() waits for the answer up to
        LEAVE_WAIT_S_MAX. Safe from another thread: a poll() waiting there returns []. Waits at most
        `timeout` seconds in all (default request_timeout_ms) — for a running poll() to let go (else
        the final commit and the callbacks are skipped, the leave is still sent), for commits, for the
        leave.
        """
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        deadline = time.monotonic() + (self._request_timeout_s if timeout is None else max(timeout, 0))
        inside_poll = self._poll_thread == threading.get_ident()  # called by a callback: the lock is ours
        got = inside_poll or self._poll_lock.acquire(timeout=-1 if timeout is None else max(timeout, 0))
        try:
            try:
                if self._group_managed and self._member is not None:
                    if got:
                        self._leave_group(commit=self._auto_commit)
                    else:
                        with self._member_lock:
                            self._member.leave(_now_ms())
                        self._wake_heartbeat()
                    self._await_leave(deadline)
                elif got and self._auto_commit:
                    self._commit_quietly(list(self._assigned.values()), asynchronous=False)
                if got and self._async_commits:
                    self._finish_async_commits(block_until=deadline)
            finally:
                if self._heartbeater is not None:
                    self._heartbeater.stop(timeout_s=1.0)
                for call in self._in_flight:
                    call.future.cancel()
                self._in_flight.clear()
                self._chunks.clear()
                for commit in self._async_commits:
                    commit.future.cancel()
                self._async_commits.clear()
                self._metadata.release_streams(self._streams)
                if self._owns_metadata:
                    self._metadata.close()
                if got:  # no poll() is waiting on it (inside_poll: the poll() that called us returns
                    # [] before waiting again); else the garbage collector closes its sockets
                    self._wakeup.close()
        finally:
            if got and not inside_poll:
                self._poll_lock.release()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a regular expression: {e}") from None


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _describe(partitions: Iterable[TopicPartition]) -> str:
    """"t-0, t-1, u-3" (at most 20 named) for logs."""
    tps = sorted(partitions)
    text = ", ".join(f"{t}-{p}" for t, p in tps[:20])
    return (text + f" and {len(tps) - 20} more") if len(tps) > 20 else (text or "nothing")

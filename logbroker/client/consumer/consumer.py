"""The consumer, the public class: checks arguments, wires the parts, runs poll(). The parts, as
Kafka's Java consumer is split:

    subscription.py  SubscriptionState: what is subscribed, the assigned partitions, their positions
    metadata.py      ConsumerMetadata: when metadata is re-read, leaders, a subscription's partitions
    fetcher.py       Fetcher: Fetch requests over the transports, prefetch, lazily decoded chunks
    offsets.py       OffsetLookup: start positions (committed offset, else auto_offset_reset), ListOffsets
    commits.py       Commits: OffsetCommit / OffsetFetch to the coordinator, async commits, auto-commit
    membership.py    Membership: the group member, its heartbeat thread, revoke/assign on poll()

poll()::

    apply membership changes ─> hand out decoded records ─> housekeeping (async commits, auto-commit,
    metadata, start positions) ─> take in finished fetches, send the next ─> drain chunks ─> wait

    no group + subscribe()               every partition of the topics (or of the topics matching the
        pattern), partition counts re-read on each metadata refresh
    group + subscribe() / assign()       see membership.py

The hot path is poll() handing out records that are already decoded: it reads the fetcher's chunk
deque and in-flight list directly (bound once per poll), no call per record. Poll deadlines,
auto-commit intervals and retries run on the injected `clock`; waits for sockets and for the
coordinator are real-time waits of the lengths that clock computes.

Not thread-safe, as Kafka's: one thread polls. `close()` may be called from another thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from logbroker.client.backoff import client_retry_policy
from logbroker.client.consumer.commits import AutoCommitTimer, CommitCallback, Commits
from logbroker.client.consumer.fetcher import FetchConfig, Fetcher
from logbroker.client.consumer.lineage_gate import LineageGate
from logbroker.client.consumer.membership import Callbacks, Membership, RebalanceCallback
from logbroker.client.consumer.metadata import ConsumerMetadata
from logbroker.client.consumer.offsets import OffsetLookup
from logbroker.client.consumer.subscription import (
    EARLIEST,
    LATEST,
    SubscriptionState,
    TopicPartition,
    compile_pattern,
    parse_reset,
)
from logbroker.client.coordinator import CoordinatorClient
from logbroker.client.encryption import Opener, load_key_file
from logbroker.client.group_member import ASSIGNORS
from logbroker.client.metadata_cache import LogThrottle, MetadataCache, metadata_for
from logbroker.client.sasl import SaslConfig
from logbroker.client.throttle import BrokerThrottle
from logbroker.client.waker import Waker
from logbroker.clock import SYSTEM_CLOCK, Clock, monotonic_s
from logbroker.errors import InvalidGroupIdError, KafkaTimeoutError, LogbrokerError
from logbroker.storage.record_batch import Message
from logbroker.tls import TlsConfig

log = logging.getLogger(__name__)


def check_settings(group: str | None, *, pattern: str | None, assignor: str, session_timeout_ms: int,
                   rebalance_timeout_ms: int, fetch_max_bytes: int, fetch_max_wait_ms: int, fetch_min_bytes: int,
                   max_partition_fetch_bytes: int, max_poll_records: int, auto_commit_interval_ms: int) -> None:
    """Consumer()'s argument checks (before any channel is opened)."""
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
        compile_pattern(pattern)


def _checked_filter(expression: str | None) -> str:
    """A CEL expression over each record's key, headers and timestamp (logbroker/group/record_filter.py)
    that the broker evaluates, sending only the matching records (positions and commits still move
    past the others); checked here (InvalidFilterError with the parser's message), and the broker
    refuses a bad one with INVALID_FILTER too. None or "": no filter."""
    if not expression:
        return ""
    from logbroker.group.record_filter import compile_filter  # cel-python: filtered consumers only

    compile_filter(expression)
    return expression


class Consumer:
    """Reads records from assigned (or subscribed) topic partitions, alone or as a group member.

    `client_id`: the name brokers log (and later apply quotas) for this consumer
    (logbroker/client_id.py; None: "logbroker-python"; ValueError when malformed).
    `encryption_key_file`: open values sealed by an encrypting producer (client/encryption.py); a
    record that cannot be opened, with or without a key file, is handed out with a
    `DecryptionError` as its value. EncryptionKeyError when the file cannot be used.
    """

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
        clock: Clock | None = None,
        filter: str | None = None,  # noqa: A002 (the issue's name for it)
        tls: TlsConfig | bool | None = None, sasl: SaslConfig | None = None,
        client_id: str | None = None, encryption_key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        """`on_assign(partitions)` / `on_revoke(partitions)` run inside poll() (group members only):
        on_revoke before partitions are given up (positions still readable, commits still accepted),
        on_assign after new ones are taken (seek() works there). `on_lost` (default: on_revoke) runs
        when the member was fenced and its partitions are already someone else's: do not commit.
        `assignor` ("range", "roundrobin", "sticky"), `session_timeout_ms` and `rebalance_timeout_ms`
        (0: the broker's defaults) are used by the coordinator when this member creates the group.
        `clock` (default: the system's) times poll deadlines, auto-commits and retries.
        `filter`: a server-side CEL filter (`_checked_filter`). `client_id`, `encryption_key_file`: above.
        """
        self._opener = Opener(load_key_file(encryption_key_file) if encryption_key_file is not None else None)
        check_settings(
            group, pattern=pattern, assignor=assignor, session_timeout_ms=session_timeout_ms,
            rebalance_timeout_ms=rebalance_timeout_ms, fetch_max_bytes=fetch_max_bytes,
            fetch_max_wait_ms=fetch_max_wait_ms, fetch_min_bytes=fetch_min_bytes,
            max_partition_fetch_bytes=max_partition_fetch_bytes, max_poll_records=max_poll_records,
            auto_commit_interval_ms=auto_commit_interval_ms,
        )
        self._reset = parse_reset(auto_offset_reset)
        self._clock = clock or SYSTEM_CLOCK
        self._monotonic = monotonic_s(clock)
        self._max_poll_records = max_poll_records
        self._group = group
        self._auto_commit = enable_auto_commit and group is not None
        self._request_timeout_s, self._retry_backoff_s = request_timeout_ms / 1000, retry_backoff_ms / 1000
        self._retry_backoff_ms = retry_backoff_ms
        self._cache, self._owns_metadata = metadata_for(bootstrap, request_timeout_ms, retry_backoff_ms,
                                                        transport, clock, tls, sasl, client_id)
        # ours, even on a shared cache (long polls hold them); record-transport fetches are read by
        # the polling thread itself (inline), not handed over by a reader thread
        self._streams = self._cache.client_streams(inline=True)
        self._wakeup = Waker()  # an Event that also wakes on the inline fetch connections' sockets
        self._poll_lock, self._closed = threading.Lock(), False
        self._poll_thread: int | None = None  # the thread inside poll() (a callback may call close())
        self._log = LogThrottle(log)
        self._subs = SubscriptionState()
        self._md = ConsumerMetadata(self._cache, self._subs, metadata_max_age_ms / 1000, self._retry_backoff_s,
                                    self._monotonic, self._log)
        self._fetcher = Fetcher(
            FetchConfig(max_bytes=fetch_max_bytes, max_wait_ms=fetch_max_wait_ms, min_bytes=fetch_min_bytes,
                        partition_max_bytes=max_partition_fetch_bytes,
                        timeout_s=(fetch_max_wait_ms + request_timeout_ms) / 1000,
                        retry_backoff_s=self._retry_backoff_s, reset=self._reset, auto_offset_reset=auto_offset_reset,
                        filter=_checked_filter(filter), opener=self._opener),
            self._subs, self._md, self._streams, self._on_fetch_done, self._log,
        )
        self._build_group(Callbacks(on_assign, on_revoke, on_lost, assignor, session_timeout_ms, rebalance_timeout_ms),
                          auto_commit_interval_ms)
        topic_list = [] if topics is None else [topics] if isinstance(topics, str) else list(topics)
        if topic_list or pattern is not None:
            self.subscribe(topic_list, pattern=pattern)

    def _build_group(self, callbacks: Callbacks, auto_commit_interval_ms: int) -> None:
        """The coordinator client (with a group), commits, the membership, start-position lookups."""
        group = self._group
        coordinator = (
            None if group is None
            else CoordinatorClient(self._cache, group, self._request_timeout_s, self._retry_backoff_s, self._clock)
        )
        self._coordinator = coordinator
        timer = AutoCommitTimer(self._auto_commit, auto_commit_interval_ms / 1000, self._monotonic())
        self._commits = Commits(group, coordinator, self._cache, self._subs, self._commit_identity, timer,
                                self._request_timeout_s, self._retry_backoff_ms, self._clock, self._monotonic,
                                self._on_fetch_done, self._log)
        self._membership = Membership(group, coordinator, self._cache, self._subs, self._commits, callbacks,
                                      self._set_assignment, self._wakeup, self._auto_commit,
                                      self._request_timeout_s, self._retry_backoff_ms, self._log)
        self._gate = LineageGate(self._subs, self._cache.parents, None if group is None else self._commits.offset_fetch,
                                 client_retry_policy(self._retry_backoff_ms), self._request_timeout_s)
        self._offsets = OffsetLookup(self._subs, self._md, self._reset,
                                     None if group is None else self._commits.offset_fetch,
                                     self._request_timeout_s, self._retry_backoff_ms, self._clock, self._monotonic,
                                     self._log)

    @property
    def _in_flight(self) -> list[Any]:
        """The fetches in flight (tests wait for a long poll to be out)."""
        return self._fetcher.in_flight

    def _commit_identity(self) -> tuple[str, int]:
        return self._membership.commit_identity()

    # -- the group ---------------------------------------------------------------------------

    @property
    def member_id(self) -> str:
        """This consumer's id in its group ("" when it is not a group member)."""
        return self._membership.member_id()

    @property
    def member_epoch(self) -> int:
        """The member epoch (-1: not a group member; 0: joining)."""
        return self._membership.member_epoch()

    @property
    def group_state(self) -> str:
        """The membership state: unsubscribed, joining, stable, reconciling, fenced, leaving, fatal."""
        return self._membership.state()

    # -- assignment --------------------------------------------------------------------------

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read exactly these partitions (replaces any subscription; a group member leaves its group)."""
        wanted = [(str(t), int(p)) for t, p in partitions]
        for t, p in wanted:
            if p < 0:
                raise ValueError(f"partition must be >= 0, got {t}-{p}")
        if self._subs.group_managed:
            self.unsubscribe()
        self._subs.subscribe(None, None)
        unknown = sorted({t for t, _ in wanted if self._cache.cached_partitions(t) is None})
        if unknown:
            with contextlib.suppress(LogbrokerError):  # poll() retries; assign() itself never fails on it
                self._cache.refresh(unknown, retry=False)
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
        compiled = None if pattern is None else compile_pattern(pattern)
        subs = self._subs
        if self._group is not None:
            if not subs.group_managed and subs.assigned:
                self._set_assignment([])  # a manual assignment ends
            subs.subscribe(topic_list, compiled)
            subs.group_managed = True
            self._membership.join(topic_list, pattern or "")
            return
        subs.subscribe(topic_list, compiled)
        self._refresh_metadata(force=True)

    def unsubscribe(self) -> None:
        """Stop reading; a group member gives up its partitions (on_revoke, commit) and leaves the group."""
        if self._subs.group_managed:
            self._membership.leave(commit=self._auto_commit)
        self._subs.subscribe(None, None)
        self._set_assignment([])

    def subscription(self) -> list[str] | None:
        return self._subs.subscription()

    def assignment(self) -> set[TopicPartition]:
        return set(self._subs.assigned)

    def _set_assignment(self, wanted: list[TopicPartition], commit_revoked: bool = True) -> None:
        revoked = self._subs.revoked_by(wanted)
        if revoked and commit_revoked and self._auto_commit:
            self._commits.commit_quietly(revoked, asynchronous=False)
        self._subs.assign(wanted)
        self._md.update_leaders()

    def _refresh_metadata(self, force: bool) -> None:
        wanted = self._md.refresh(force)
        if wanted is not None:
            self._set_assignment(wanted)

    # -- positions ---------------------------------------------------------------------------

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """The next poll() returns records of this partition from `offset` on."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._subs.state(topic, partition).seek(offset)

    def seek_to_beginning(self, topic: str | None = None, partition: int | None = None) -> None:
        """Seek to the log start offset: of one partition, of a topic's assigned partitions, or of all."""
        self._offsets.seek_to(self._subs.select(topic, partition), EARLIEST)

    def seek_to_end(self, topic: str | None = None, partition: int | None = None) -> None:
        """Seek to the high watermark (only records produced from now on will be read)."""
        self._offsets.seek_to(self._subs.select(topic, partition), LATEST)

    def position(self, topic: str, partition: int) -> int:
        """Offset of the next record poll() returns for this partition (looked up if not known yet).

        Raises KafkaTimeoutError when no start offset is found within request_timeout_ms.
        """
        st = self._subs.state(topic, partition)
        deadline = self._monotonic() + self._request_timeout_s
        backoff = client_retry_policy(self._retry_backoff_ms).start(int(deadline * 1000), self._clock)
        while st.position is None:
            now = self._monotonic()
            st.retry_at = min(st.retry_at, now)
            self._offsets.initialize_positions(now)
            if st.position is not None:
                break
            wait_ms = backoff.failed()
            if wait_ms is None or self._monotonic() + wait_ms / 1000 >= deadline:
                raise KafkaTimeoutError(f"no start offset found for {topic}-{partition} within request_timeout_ms")
            time.sleep(wait_ms / 1000)
            self._refresh_metadata(force=False)
        return st.position

    def highwater(self, topic: str, partition: int) -> int:
        """The high watermark seen in the last fetch response (-1 before the first)."""
        return self._subs.state(topic, partition).high_watermark

    # -- offsets of the group ----------------------------------------------------------------

    def committed(self, topic: str, partition: int) -> int | None:
        """The group's committed offset for the partition, None if nothing is committed."""
        deadline = self._monotonic() + self._request_timeout_s
        off = self._commits.offset_fetch([(topic, partition)], deadline).get((topic, partition), -1)
        return off if off >= 0 else None

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
        self._commits.require_group()
        if offsets is None:
            offsets = self._subs.positions()
        else:
            offsets = {(str(t), int(p)): int(off) for (t, p), off in offsets.items()}
        self._commits.commit(offsets, asynchronous, callback)

    # -- poll --------------------------------------------------------------------------------

    def poll(self, timeout_ms: int | None = None, max_records: int | None = None) -> list[Message]:
        """Records from the assigned partitions, in offset order per partition.

        Waits up to `timeout_ms` (None: until there are records or the consumer is closed) and
        returns at most `max_records` (default: max_poll_records). Returns [] on timeout.
        """
        if self._closed:
            raise LogbrokerError("poll() on a closed consumer")
        if not self._subs.subscribed() and not self._subs.assigned:
            raise LogbrokerError("poll() needs subscribe() or assign() first")
        limit = max_records if max_records is not None else self._max_poll_records
        if limit <= 0:
            raise ValueError("max_records must be positive")
        return self._poll(timeout_ms, limit)

    def _poll(self, timeout_ms: int | None, limit: int) -> list[Message]:
        """poll() without the argument checks; [] once the consumer is closed."""
        deadline = None if timeout_ms is None else self._monotonic() + max(timeout_ms, 0) / 1000
        with self._poll_lock:
            self._poll_thread = threading.get_ident()
            try:
                return self._poll_locked(deadline, limit)
            finally:
                self._poll_thread = None

    def _poll_locked(self, deadline: float | None, limit: int) -> list[Message]:
        fetcher = self._fetcher
        chunks = fetcher.chunks  # the same deque and list for the consumer's life
        in_flight = fetcher.in_flight
        membership = self._membership
        monotonic = self._monotonic
        pumped = False  # the inline connections were read once without waiting (a poll past its deadline)
        while True:
            if self._closed:
                return []
            if membership.changed:  # before any record: none may follow on_revoke of its partition
                membership.apply()
                if self._closed:  # by a callback
                    return []
            # Records already decoded go out first: no RPC bookkeeping on the hot path.
            if chunks:
                head = chunks[0]
                if head.next_message < len(head.messages) and head.epoch == head.state.epoch:
                    out = head.take(limit)
                    head.state.position = out[-1].offset + 1
                    if len(out) == limit and in_flight:
                        return out
                    # the next fetch goes out while these records are used (it was deferred after a
                    # small response, or completes now)
                    fetcher.collect_and_send(monotonic())
                    return out
            now = monotonic()
            self._wakeup.clear()
            self._housekeeping(now)
            deferred = fetcher.collect_and_send(now, defer_after_small=True)
            if fetcher.pending_error is not None:
                if deferred:
                    fetcher.collect_and_send(now)
                err, fetcher.pending_error = fetcher.pending_error, None
                raise err
            out = fetcher.drain(limit)
            if out:
                if not deferred:  # else the next poll() sends the next fetch
                    fetcher.collect_and_send(monotonic())
                return out
            if deferred:
                fetcher.collect_and_send(monotonic())
            if chunks:
                continue  # only control batches or skipped records: go on decoding
            waited = self._wait(now, deadline, pumped)
            if waited is None:
                return []
            pumped = waited

    def _wait(self, now: float, deadline: float | None, pumped: bool) -> bool | None:
        """Wait for a fetch, the deadline, or the next timer; None: poll() returns [] (deadline
        passed, closed). Past the deadline the inline connections are read once, without waiting
        (`pumped`, returned True then, when that completed a fetch)."""
        fetcher = self._fetcher
        wait = self._wait_time(now, deadline)
        inline = fetcher.inline_connections()
        if (wait is not None and wait <= 0) or self._closed:
            if inline and not self._closed and not pumped:  # poll(0): read what has come, once
                for conn in inline:
                    conn.pump()
                if fetcher.any_done():
                    return True
            return None
        if fetcher.any_done():
            return pumped  # completed on this thread (by pump(), or at once when sent), which sets no _wakeup
        for conn in self._wakeup.wait(wait, inline):
            conn.pump()  # completes its fetches here
        return pumped

    def _wait_time(self, now: float, deadline: float | None) -> float | None:
        """Seconds to sleep: until the deadline, the next retry or commit; None: until woken."""
        wake = deadline
        for st in self._subs.assigned.values():
            if st.retry_at > now and (not st.in_flight) and (wake is None or st.retry_at < wake):
                wake = st.retry_at
        timer = self._commits.auto
        if timer.enabled and (wake is None or timer.next_at < wake):
            wake = timer.next_at
        metadata_at = self._md.wake_at(now)
        if metadata_at is not None and (wake is None or self._md.retry_at < wake):
            wake = metadata_at
        if not self._fetcher.in_flight and self._subs.assigned and wake is None:
            wake = now + self._retry_backoff_s  # nothing in flight to wake us: look again soon
        return None if wake is None else wake - now

    def _housekeeping(self, now: float) -> None:
        self._commits.maybe_auto_commit(now)
        if self._md.due(now):
            self._refresh_metadata(force=False)
        if self._subs.need_positions:
            self._offsets.initialize_positions(now)
        self._gate.update(now)  # after positions: a child's first fetch waits for its parents
        if self._gate.lineage_unknown:
            self._md.stale = True  # re-read until the metadata has the split offsets

    def _on_fetch_done(self, _future: object) -> None:
        if threading.get_ident() != self._poll_thread:  # the poll thread looks at done fetches before it waits
            self._wakeup.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Message]:
        """Every record, forever: ends when the consumer is closed (from another thread)."""
        if not self._subs.subscribed() and not self._subs.assigned:
            raise LogbrokerError("iterating needs subscribe() or assign() first")
        while not self._closed:
            yield from self._poll(None, self._max_poll_records)

    @property
    def throttle(self) -> BrokerThrottle:
        """The brokers' throttling of this consumer (over its fetch quota): counters and last time."""
        return self._fetcher.throttle

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
        deadline = self._monotonic() + (self._request_timeout_s if timeout is None else max(timeout, 0))
        inside_poll = self._poll_thread == threading.get_ident()  # called by a callback: the lock is ours
        got = inside_poll or self._poll_lock.acquire(timeout=-1 if timeout is None else max(timeout, 0))
        try:
            try:
                self._close_group(got, deadline)
            finally:
                self._release(got)
        finally:
            if got and not inside_poll:
                self._poll_lock.release()

    def _close_group(self, got: bool, deadline: float) -> None:
        """close()'s group part: leave (a member) or commit; complete async commits. `got`: the poll lock."""
        membership = self._membership
        if self._subs.group_managed and membership.member is not None:
            if got:
                membership.leave(commit=self._auto_commit)
            else:
                membership.leave_now()
            membership.await_leave(deadline, self._monotonic())
        elif got and self._auto_commit:
            self._commits.commit_quietly(list(self._subs.assigned.values()), asynchronous=False)
        if got and self._commits.pending:
            self._commits.finish_async(block_until=deadline)

    def _release(self, got: bool) -> None:
        """close()'s last part: the heartbeat thread, fetches, commits, streams, channels."""
        self._membership.stop()
        self._fetcher.close()
        self._commits.cancel()
        self._cache.release_streams(self._streams)
        if self._owns_metadata:
            self._cache.close()
        if got:  # no poll() is waiting on it (inside_poll: the poll() that called us returns
            # [] before waiting again); else the garbage collector closes its sockets
            self._wakeup.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

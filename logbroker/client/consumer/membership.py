"""Group membership on the consumer's side (the membership half of Kafka's `ConsumerCoordinator`).

    group + subscribe(topics | pattern)  a member of the group: a heartbeat thread keeps the membership
        and receives the assignment the coordinator computed (logbroker/client/group_member.py,
        logbroker/client/coordinator.py); poll() applies changes on the polling thread (`apply`):
        revoked partitions first (on_revoke, then a synchronous commit with auto-commit on, then their
        buffered and in-flight records are dropped and the smaller assignment is reported), then new
        ones (on_assign; positions from committed offsets, else auto_offset_reset). No record of a
        partition comes out of poll() after on_revoke for it returned. Fenced (evicted, coordinator
        failed over): every partition is lost (on_lost, default on_revoke; no commit), then it rejoins.
    group + assign()                     manual assignment; commits as a non-member (member id "",
        accepted while the group has no members)

close() leaves the group promptly (heartbeat at epoch -1) after revoking and committing.

The member's times are the heartbeat thread's: system monotonic milliseconds (`_now_ms`), not the
consumer's injected clock, since both threads drive the same member.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable

from logbroker.client.consumer.commits import Commits
from logbroker.client.consumer.subscription import SubscriptionState, TopicPartition
from logbroker.client.coordinator import CoordinatorClient, Heartbeater
from logbroker.client.group_member import GroupMember, MemberState
from logbroker.client.metadata_cache import LogThrottle, MetadataCache
from logbroker.client.waker import Waker
from logbroker.errors import LogbrokerError, UnknownMemberIdError

log = logging.getLogger(__name__)

# close() waits at most this long for the coordinator to answer the leave heartbeat.
LEAVE_WAIT_S_MAX = 5.0

RebalanceCallback = Callable[[set[TopicPartition]], None]
# The consumer's assignment change: (partitions, commit the revoked ones first).
AssignFn = Callable[[list[TopicPartition], bool], None]


class Callbacks:
    """The user's rebalance callbacks and the membership's settings."""

    __slots__ = ("on_assign", "on_revoke", "on_lost", "assignor", "session_timeout_ms", "rebalance_timeout_ms")

    def __init__(self, on_assign: RebalanceCallback | None, on_revoke: RebalanceCallback | None,
                 on_lost: RebalanceCallback | None, assignor: str, session_timeout_ms: int,
                 rebalance_timeout_ms: int) -> None:
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.on_lost = on_lost
        self.assignor = assignor
        self.session_timeout_ms = session_timeout_ms
        self.rebalance_timeout_ms = rebalance_timeout_ms


class Membership:
    """The consumer's group membership: the member, its heartbeat thread, and applying its changes.

    `changed` is set by the heartbeat thread when poll() has membership changes to apply."""

    def __init__(self, group: str | None, coordinator: CoordinatorClient | None, cache: MetadataCache,
                 subscription: SubscriptionState, commits: Commits, callbacks: Callbacks, assign: AssignFn,
                 wakeup: Waker, auto_commit: bool, request_timeout_s: float, retry_backoff_ms: int,
                 throttle: LogThrottle) -> None:
        self.group = group
        self._coordinator = coordinator
        self._cache = cache
        self._subs = subscription
        self._commits = commits
        self._cb = callbacks
        self._assign = assign
        self._wakeup = wakeup
        self._auto_commit = auto_commit
        self._request_timeout_s = request_timeout_s
        self._retry_backoff_ms = retry_backoff_ms
        self._log = throttle
        self.member: GroupMember | None = None
        self.lock = threading.Lock()
        self.heartbeater: Heartbeater | None = None
        self.changed = False
        self.left = threading.Event()

    def _active(self) -> GroupMember | None:
        return self.member if self._subs.group_managed else None

    def member_id(self) -> str:
        member = self._active()
        return "" if member is None else member.member_id

    def member_epoch(self) -> int:
        member = self._active()
        if member is None:
            return -1
        with self.lock:
            return member.member_epoch

    def state(self) -> str:
        member = self._active()
        if member is None:
            return MemberState.UNSUBSCRIBED.value
        with self.lock:
            return member.state.value

    def commit_identity(self) -> tuple[str, int]:
        """(member id, member epoch) to commit with: the member's, or ("", -1) when not group-managed."""
        member = self._active()
        if member is None:
            return "", -1
        with self.lock:
            identity = member.commit_identity()
            state = member.state
        if identity is None:
            raise UnknownMemberIdError(
                f"not a member of group {self.group} right now ({state.value}): nothing was committed"
            )
        return identity

    def join(self, topics: list[str], pattern: str) -> None:
        """Subscribe as a group member (creating the membership and its heartbeat thread once)."""
        assert self.group is not None and self._coordinator is not None
        if self.member is None:
            cb = self._cb
            self.member = GroupMember(
                self.group, uuid.uuid4().hex, assignor=cb.assignor, session_timeout_ms=cb.session_timeout_ms,
                rebalance_timeout_ms=cb.rebalance_timeout_ms, retry_backoff_ms=self._retry_backoff_ms,
                rng=random.Random(),  # jitter on the heartbeat backoff
            )
            self.heartbeater = Heartbeater(
                self.member, self.lock, self._coordinator, self._cache, self._on_member_change,
                self._request_timeout_s, cb.session_timeout_ms,
            )
            self.heartbeater.start()
        with self.lock:
            self.member.subscribe(topics, pattern, _now_ms())
            self.left.clear()
        self.wake_heartbeat()

    def _on_member_change(self) -> None:
        """Heartbeat thread: wake the polling thread when there is something to apply."""
        member = self.member
        assert member is not None
        with self.lock:
            state = member.state
            pending = state is MemberState.FATAL or member.reconciliation() is not None
        if state is MemberState.UNSUBSCRIBED:
            self.left.set()
        if pending:
            self.changed = True
            self._wakeup.set()

    def wake_heartbeat(self) -> None:
        if self.heartbeater is not None:
            self.heartbeater.wake()

    def apply(self) -> None:
        """Polling thread: revoke, then assign, as the member's latest assignment says; callbacks run here."""
        self.changed = False
        member = self._active()
        if member is None:
            return
        with self.lock:
            rec = member.reconciliation()
            fatal = member.error if member.state is MemberState.FATAL else None
        if fatal is not None:
            self.changed = True  # raised by every poll() until subscribe() is called again
            raise fatal
        if rec is None:
            return
        error: BaseException | None = None
        if rec.revoke:
            error = self.revoke(set(rec.revoke), lost=rec.lost, commit=self._auto_commit and not rec.lost)
        if rec.assign or rec.joined:
            assign_error = self._take(member, rec.assign)
            error = error or assign_error
        if error is not None:
            raise error

    def _take(self, member: GroupMember, assign: Iterable[TopicPartition]) -> BaseException | None:
        """Take newly assigned partitions, then on_assign; returns the callback's exception."""
        with self.lock:
            taken = member.assigned(assign, _now_ms())
        if taken:
            unknown = sorted({t for t, p in taken if (self._cache.cached_partitions(t) or 0) <= p})
            if unknown:  # leaders of topics this consumer has not seen yet (one attempt: poll() retries)
                with contextlib.suppress(LogbrokerError):
                    self._cache.refresh(unknown, retry=False)
            self._assign(list(self._subs.assigned) + sorted(taken), False)
            self.wake_heartbeat()
        log.info("group %s: member %s assigned %s", self.group, member.member_id, describe(taken))
        if self._cb.on_assign is not None:
            try:
                self._cb.on_assign(set(taken))
            except Exception as e:
                log.exception("on_assign of group %s raised", self.group)
                return e
        return None

    def revoke(self, partitions: set[TopicPartition], lost: bool, commit: bool) -> BaseException | None:
        """Give partitions up: callback, commit, drop their records, tell the member. Returns the
        callback's exception (the revocation completes regardless)."""
        member = self.member
        assert member is not None
        error: BaseException | None = None
        callback = (self._cb.on_lost or self._cb.on_revoke) if lost else self._cb.on_revoke
        log.info("group %s: member %s %s %s", self.group, member.member_id, "lost" if lost else "revoking",
                 describe(partitions))
        if callback is not None:
            try:
                callback(set(partitions))
            except Exception as e:
                log.exception("%s of group %s raised", "on_lost" if lost else "on_revoke", self.group)
                error = e
        assigned = self._subs.assigned
        if commit:
            self._commits.commit_quietly([st for tp, st in assigned.items() if tp in partitions], asynchronous=False)
        self._assign([tp for tp in self._subs.assigned if tp not in partitions], False)
        with self.lock:
            member.revoked(partitions, _now_ms())
        self.wake_heartbeat()
        return error

    def leave(self, commit: bool) -> None:
        """Polling thread: give up everything (callbacks, commit) and leave; the heartbeat thread sends it."""
        member = self.member
        assert member is not None
        with self.lock:
            owned = set(member.owned)
            lost = member.state is MemberState.FENCED
        error = self.revoke(owned, lost=lost, commit=commit and not lost) if owned else None
        if self._subs.assigned:
            self._assign([], False)
        with self.lock:
            member.leave(_now_ms())
            if member.state is MemberState.UNSUBSCRIBED:
                self.left.set()
        self._subs.group_managed = False
        self.changed = False
        self.wake_heartbeat()
        if error is not None:
            log.warning("group %s: leaving despite the callback's error: %s", self.group, error)

    def leave_now(self) -> None:
        """Any thread (close() without the poll lock): send the leave, give nothing up here."""
        assert self.member is not None
        with self.lock:
            self.member.leave(_now_ms())
        self.wake_heartbeat()

    def await_leave(self, deadline: float, now: float) -> None:
        """Wait (up to LEAVE_WAIT_S_MAX, and `deadline`) for the coordinator to answer the leave."""
        member = self.member
        if member is None:
            return
        if not self.left.wait(max(min(deadline - now, LEAVE_WAIT_S_MAX), 0)):
            with self.lock:
                member.abandon()
            self._log.warning("leave", "group %s: the coordinator did not answer the leave in time: the "
                              "session timeout will evict member %s", self.group, member.member_id)

    def stop(self) -> None:
        if self.heartbeater is not None:
            self.heartbeater.stop(timeout_s=1.0)


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def describe(partitions: Iterable[TopicPartition]) -> str:
    """"t-0, t-1, u-3" (at most 20 named) for logs."""
    tps = sorted(partitions)
    text = ", ".join(f"{t}-{p}" for t, p in tps[:20])
    return (text + f" and {len(tps) - 20} more") if len(tps) > 20 else (text or "nothing")

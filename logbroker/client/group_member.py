"""The client side of consumer-group membership: a pure state machine (no I/O, no threads, no clock).

The broker computes assignments (KIP-848, see logbroker/group/membership.py); a member only has to
heartbeat, apply the assignment each response carries, and say what it owns. `GroupMember` decides
*when* to heartbeat and *what* to send; the consumer's shell (logbroker/client/coordinator.py) sends
the requests and feeds back responses and failures, and the polling thread applies the changes it
reports (`reconciliation()`), calling the user's callbacks. Times are monotonic milliseconds passed
in by the caller, so tests drive it with a manual clock.

Sets::

    owned       the partitions the consumer holds now (the poll thread changes it: revoked/assigned)
    assignment  the partitions the coordinator's last response said the member may own

    revoke = owned - assignment   give up (on_revoke, commit), then `revoked()`: the smaller owned goes
                                  out in a heartbeat at once (the next owner waits for it)
    assign = assignment - owned   `assigned()` takes them (atomically with checking they are still
                                  assigned), then on_assign, committed offsets or auto_offset_reset

A reconciliation is computed when the poll thread asks, from the latest assignment, so a partition
given and taken back between two polls is never touched. The poll thread runs the callbacks outside
the shell's lock; a fence that lands meanwhile finds what was taken in `owned` and reports it lost.

States (`MemberState`) and transitions::

    UNSUBSCRIBED  not in the group: before subscribe(), after leaving
    JOINING       heartbeats at epoch 0 (with the subscription) until the coordinator answers
    STABLE        a member, owned == assignment
    RECONCILING   a member, owned != assignment: the poll thread has changes to apply
    FENCED        the coordinator answered UNKNOWN_MEMBER_ID / FENCED_MEMBER_EPOCH (evicted, coordinator
                  failover), or no heartbeat succeeded for session_timeout_ms: every owned partition is
                  lost (no commit); no heartbeats until the poll thread has dropped them, then JOINING
                  again with the same member id
    LEAVING       a heartbeat at epoch -1 is due (after the one in flight, if any)
    FATAL         a non-retriable error (invalid group id or regex, group full, bad request): heartbeats
                  stop, `error` is raised by every poll() until subscribe() is called again

    UNSUBSCRIBED/FATAL --subscribe--> JOINING --response--> STABLE | RECONCILING
    STABLE <--response / revoked / assigned--> RECONCILING
    JOINING/STABLE/RECONCILING --UNKNOWN_MEMBER_ID, FENCED_MEMBER_EPOCH, session lapse--> FENCED
    FENCED --owned dropped--> JOINING
    any --leave--> LEAVING --leave answered (or failed past the caller's deadline: abandon)--> UNSUBSCRIBED
                   (straight to UNSUBSCRIBED when no heartbeat went out since the last one)
    JOINING/STABLE/RECONCILING --non-retriable error--> FATAL

Heartbeat timing: one heartbeat in flight at a time. The next one is due heartbeat_interval_ms (from
the last response) after a response; at once after owned or the subscription changed (a revocation
must reach the coordinator promptly: the new owner waits for it); after a failure, retry_backoff_ms
doubled per consecutive failure up to 1 s, less up to 20 % jitter (client/backoff.py; the jitter's random source is injected). Every heartbeat carries owned; the
subscription goes with the join and whenever it changed.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass

from logbroker.client.backoff import CLIENT_RETRY_JITTER, client_retry_policy
from logbroker.client.backoff import RETRY_BACKOFF_MAX_MS as RETRY_BACKOFF_MAX_MS  # re-exported
from logbroker.errors import (
    BrokerError,
    FencedMemberEpochError,
    LogbrokerError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnknownMemberIdError,
)

TopicPartition = tuple[str, int]

JOIN_EPOCH = 0
LEAVE_EPOCH = -1
HEARTBEAT_INTERVAL_DEFAULT_MS = 500  # until the coordinator says otherwise
ASSIGNORS = ("range", "roundrobin", "sticky")


class MemberState(enum.Enum):
    UNSUBSCRIBED = "unsubscribed"
    JOINING = "joining"
    STABLE = "stable"
    RECONCILING = "reconciling"
    FENCED = "fenced"
    LEAVING = "leaving"
    FATAL = "fatal"


@dataclass(frozen=True)
class HeartbeatRequest:
    """What to send; `None` fields are left unset on the wire (= unchanged)."""

    member_id: str
    member_epoch: int
    subscribed_topics: tuple[str, ...] | None
    subscribed_regex: str | None
    owned: tuple[TopicPartition, ...] | None
    assignor: str
    session_timeout_ms: int
    rebalance_timeout_ms: int


@dataclass(frozen=True)
class HeartbeatResponse:
    error: BrokerError | PermissionDeniedError | UnauthenticatedError | None
    member_id: str = ""
    member_epoch: int = 0
    heartbeat_interval_ms: int = 0
    assignment: frozenset[TopicPartition] = frozenset()
    session_timeout_ms: int = 0  # the group's, as the coordinator evicts by it (0: not told)


@dataclass(frozen=True)
class Reconciliation:
    """What the poll thread must do: first give up `revoke`, then take `assign`."""

    revoke: frozenset[TopicPartition]
    assign: frozenset[TopicPartition]
    lost: bool  # `revoke` is already gone (fenced): no commit, on_lost rather than on_revoke
    joined: bool  # the first assignment since (re)joining: on_assign runs even when `assign` is empty


class GroupMember:
    """One consumer's membership of one group. See the module doc. Not thread-safe: the shell locks."""

    def __init__(
        self,
        group_id: str,
        member_id: str,
        *,
        assignor: str = "sticky",
        session_timeout_ms: int = 0,
        rebalance_timeout_ms: int = 0,
        retry_backoff_ms: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        if not group_id:
            raise ValueError("group id must not be empty")
        if not member_id:
            raise ValueError("member id must not be empty (the client picks its own, KIP-1082)")
        if assignor not in ASSIGNORS:
            raise ValueError(f"assignor must be one of {', '.join(ASSIGNORS)}, not {assignor!r}")
        if session_timeout_ms < 0 or rebalance_timeout_ms < 0 or retry_backoff_ms < 0:
            raise ValueError("session_timeout_ms, rebalance_timeout_ms and retry_backoff_ms must be >= 0 (0: default)")
        self.group_id = group_id
        self._member_id = member_id
        self._assignor = assignor
        self._session_timeout_ms = session_timeout_ms
        self._rebalance_timeout_ms = rebalance_timeout_ms
        self._retry_backoff_ms = retry_backoff_ms
        # Unbounded attempts: a member keeps trying. Jitter only with an injected random source (the
        # consumer gives one), so the state machine stays pure and deterministic without it.
        self._retry_policy = client_retry_policy(retry_backoff_ms, jitter=CLIENT_RETRY_JITTER if rng else 0.0)
        self._rng = rng
        self._state = MemberState.UNSUBSCRIBED
        self._epoch = JOIN_EPOCH
        self._topics: tuple[str, ...] = ()
        self._regex = ""
        self._subscription_dirty = False
        self._owned: frozenset[TopicPartition] = frozenset()
        self._assignment: frozenset[TopicPartition] = frozenset()
        self._announce_join = False
        self._interval_ms = HEARTBEAT_INTERVAL_DEFAULT_MS
        self._due_ms = 0
        self._in_flight_epoch: int | None = None  # epoch of the heartbeat in flight
        self._failures = 0
        self._last_success_ms: int | None = None  # when the last answered heartbeat was sent
        self._sent_ms = 0  # when the heartbeat in flight was sent
        self._group_session_timeout_ms = 0  # from the coordinator; wins over the configured value
        self._rejoin_after_leave = False
        self._report_owned = False  # owned changed since the last heartbeat that carried it
        self._sent_since_unsubscribed = False  # the coordinator may know this member
        self.error: BrokerError | PermissionDeniedError | UnauthenticatedError | None = None  # set in FATAL

    # -- queries ------------------------------------------------------------------------------------

    @property
    def state(self) -> MemberState:
        return self._state

    @property
    def member_id(self) -> str:
        return self._member_id

    @property
    def member_epoch(self) -> int:
        return self._epoch

    @property
    def owned(self) -> frozenset[TopicPartition]:
        return self._owned

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        return self._assignment

    @property
    def in_flight(self) -> bool:
        return self._in_flight_epoch is not None

    def commit_identity(self) -> tuple[str, int] | None:
        """(member id, epoch) to commit offsets with, None while not a member (joining, fenced, ...)."""
        if self._epoch > 0 and self._state in (MemberState.STABLE, MemberState.RECONCILING, MemberState.LEAVING):
            return self._member_id, self._epoch
        return None

    def reconciliation(self) -> Reconciliation | None:
        """The changes the poll thread has to apply, or None."""
        if self._state is MemberState.FENCED:
            return Reconciliation(self._owned, frozenset(), lost=True, joined=False) if self._owned else None
        if self._state not in (MemberState.STABLE, MemberState.RECONCILING):
            return None
        revoke = self._owned - self._assignment
        assign = self._assignment - self._owned
        if not revoke and not assign and not self._announce_join:
            return None
        return Reconciliation(revoke, assign, lost=False, joined=self._announce_join)

    def wakeup_ms(self) -> int | None:
        """When `next_heartbeat` may have something to do next (None: not until an event)."""
        if self._in_flight_epoch is not None or self._state in (
            MemberState.UNSUBSCRIBED, MemberState.FENCED, MemberState.FATAL
        ):
            return None
        due = self._due_ms
        lapse = self._session_lapse_ms()
        return due if lapse is None else min(due, lapse)

    def _session_lapse_ms(self) -> int | None:
        """When the coordinator has evicted us for sure: a session after the last answered heartbeat was
        sent (the coordinator's clock started no earlier), by the group's session timeout."""
        timeout_ms = self._group_session_timeout_ms or self._session_timeout_ms
        if (timeout_ms <= 0 or self._last_success_ms is None
                or self._state not in (MemberState.STABLE, MemberState.RECONCILING)):
            return None
        return self._last_success_ms + timeout_ms

    # -- the application's events (poll thread) --------------------------------------------------

    def subscribe(self, topics: Iterable[str], regex: str, now_ms: int) -> None:
        """(Re)subscribe: joins when not a member, else sends the new subscription promptly."""
        topic_list = tuple(sorted(set(topics)))
        if not topic_list and not regex:
            raise ValueError("subscribe to at least one topic or a pattern")
        changed = (topic_list, regex) != (self._topics, self._regex)
        self._topics, self._regex = topic_list, regex
        if self._state in (MemberState.UNSUBSCRIBED, MemberState.FATAL):
            self.error = None
            self._join(now_ms)
        elif self._state is MemberState.LEAVING:
            self._rejoin_after_leave = True
        elif changed:
            self._subscription_dirty = True
            self._due_ms = now_ms

    def revoked(self, partitions: Iterable[TopicPartition], now_ms: int) -> None:
        """The poll thread gave these up (on_revoke ran, offsets committed): report it at once."""
        gone = frozenset(partitions)
        if not gone & self._owned:
            return
        self._owned -= gone
        if self._state is MemberState.FENCED:
            if not self._owned:
                self._join(now_ms)
            return
        self._report_owned = True
        self._due_ms = now_ms
        self._settle()

    def assigned(self, partitions: Iterable[TopicPartition], now_ms: int) -> frozenset[TopicPartition]:
        """The poll thread takes these (before running on_assign); returns the ones still assigned.

        Taking is atomic with the check, so a fence that comes while on_assign runs finds them owned
        and has them dropped as lost.
        """
        self._announce_join = False
        if self._state not in (MemberState.STABLE, MemberState.RECONCILING):
            return frozenset()
        got = (frozenset(partitions) & self._assignment) - self._owned
        if got:
            self._owned |= got
            self._report_owned = True
            self._due_ms = now_ms
        self._settle()
        return got

    def leave(self, now_ms: int) -> None:
        """Leave the group. The caller has already dropped what it owned (or gives it up unannounced)."""
        self._owned = frozenset()
        self._assignment = frozenset()
        self._announce_join = False
        self._rejoin_after_leave = False
        if self._state in (MemberState.UNSUBSCRIBED, MemberState.LEAVING):
            return
        if not self._sent_since_unsubscribed:
            self._unsubscribed()  # the coordinator cannot know this member
            return
        self._state = MemberState.LEAVING
        self._due_ms = now_ms

    def abandon(self) -> None:
        """Stop trying to leave (the caller's deadline passed): the session timeout evicts the member."""
        if self._state is MemberState.LEAVING:
            self._unsubscribed()

    # -- the heartbeat shell's events ----------------------------------------------------------------

    def next_heartbeat(self, now_ms: int) -> HeartbeatRequest | None:
        """The heartbeat to send now (it is then in flight), or None."""
        lapse = self._session_lapse_ms()
        if lapse is not None and now_ms >= lapse:
            self._in_flight_epoch = None  # an answer to a heartbeat still in flight is ignored
            self._fence()  # no answer for a whole session: the coordinator has evicted us by now
            return None
        if self._in_flight_epoch is not None or now_ms < self._due_ms:
            return None
        state = self._state
        if state is MemberState.JOINING:
            req = HeartbeatRequest(self._member_id, JOIN_EPOCH, self._topics, self._regex, (), self._assignor,
                                   self._session_timeout_ms, self._rebalance_timeout_ms)
            self._subscription_dirty = False
        elif state in (MemberState.STABLE, MemberState.RECONCILING):
            dirty = self._subscription_dirty
            self._subscription_dirty = False
            req = HeartbeatRequest(
                self._member_id, self._epoch, self._topics if dirty else None, self._regex if dirty else None,
                tuple(sorted(self._owned)), self._assignor, self._session_timeout_ms, self._rebalance_timeout_ms,
            )
        elif state is MemberState.LEAVING:
            req = HeartbeatRequest(self._member_id, LEAVE_EPOCH, None, None, None, self._assignor,
                                   self._session_timeout_ms, self._rebalance_timeout_ms)
        else:
            return None
        if req.owned is not None:
            self._report_owned = False
        self._in_flight_epoch = req.member_epoch
        self._sent_ms = now_ms
        self._sent_since_unsubscribed = True
        return req

    def on_response(self, resp: HeartbeatResponse, now_ms: int) -> None:
        """The coordinator answered the heartbeat in flight (errors as data, see on_failure too)."""
        sent_epoch = self._in_flight_epoch
        self._in_flight_epoch = None
        if sent_epoch is None:
            return  # nothing was in flight (abandoned meanwhile)
        err = resp.error
        if self._state is MemberState.LEAVING:
            if isinstance(err, (UnknownMemberIdError, FencedMemberEpochError)):
                self._unsubscribed()  # not (or no longer) a member: nothing to leave
            elif err is not None and err.retriable:
                self._backoff(now_ms)
            elif sent_epoch == LEAVE_EPOCH or err is not None:
                self._unsubscribed()
            else:
                self._accept(resp, now_ms)
                self._due_ms = now_ms  # the heartbeat before the leave was answered: now leave
            return
        if self._state not in (MemberState.JOINING, MemberState.STABLE, MemberState.RECONCILING):
            return
        if err is not None:
            if isinstance(err, (UnknownMemberIdError, FencedMemberEpochError)):
                was_joining = self._state is MemberState.JOINING
                self._fence()
                if was_joining:
                    self._backoff(now_ms)  # a join refused like this: do not hammer the coordinator
            elif err.retriable:
                self._backoff(now_ms)
            else:
                self._state = MemberState.FATAL
                self.error = err
            return
        joining = self._state is MemberState.JOINING
        self._accept(resp, now_ms)
        self._assignment = resp.assignment
        if joining:
            self._announce_join = True
        self._state = MemberState.RECONCILING
        self._settle()
        self._due_ms = now_ms if self._subscription_dirty or self._report_owned else now_ms + self._interval_ms

    def on_failure(self, err: LogbrokerError, now_ms: int) -> None:
        """The heartbeat in flight got no answer (unreachable, timed out, not the coordinator)."""
        if self._in_flight_epoch is None:
            return
        self._in_flight_epoch = None
        self._backoff(now_ms)

    # -- internals ----------------------------------------------------------------------------------

    def _accept(self, resp: HeartbeatResponse, now_ms: int) -> None:
        self._failures = 0
        self._last_success_ms = min(self._sent_ms, now_ms)
        if resp.session_timeout_ms > 0:
            self._group_session_timeout_ms = resp.session_timeout_ms
        if resp.member_id:
            self._member_id = resp.member_id
        self._epoch = resp.member_epoch
        if resp.heartbeat_interval_ms > 0:
            self._interval_ms = resp.heartbeat_interval_ms

    def _settle(self) -> None:
        if self._state in (MemberState.STABLE, MemberState.RECONCILING):
            done = self._owned == self._assignment and not self._announce_join
            self._state = MemberState.STABLE if done else MemberState.RECONCILING

    def _join(self, now_ms: int) -> None:
        self._state = MemberState.JOINING
        self._epoch = JOIN_EPOCH
        self._assignment = frozenset()
        self._subscription_dirty = False
        self._last_success_ms = None
        self._due_ms = now_ms

    def _fence(self) -> None:
        self._epoch = JOIN_EPOCH
        self._assignment = frozenset()
        self._announce_join = False
        self._state = MemberState.FENCED
        if not self._owned:
            self._join(0)  # nothing to drop: rejoin at once

    def _unsubscribed(self) -> None:
        self._state = MemberState.UNSUBSCRIBED
        self._sent_since_unsubscribed = False
        self._epoch = JOIN_EPOCH
        self._in_flight_epoch = None
        self._last_success_ms = None
        self._failures = 0
        if self._rejoin_after_leave:
            self._rejoin_after_leave = False
            self._join(0)

    def _backoff(self, now_ms: int) -> None:
        self._failures += 1
        delay = self._retry_policy.delay_ms(self._failures, self._rng)
        self._due_ms = now_ms + (delay or 0)  # no attempt bound: never None

"""Talking to a consumer group's coordinator: finding it, following it, and the heartbeat thread.

The coordinator of group G is the leader of partition hash(G) of `__consumer_offsets`; any broker
answers `FindCoordinator(G)` with its address. `CoordinatorClient` caches that address, forgets it
when a call says NOT_COORDINATOR / COORDINATOR_NOT_AVAILABLE or the broker is unreachable, and finds
it again (retrying COORDINATOR_NOT_AVAILABLE: the internal topic is created on the first lookup, and a
failed-over partition needs a new leader). COORDINATOR_LOAD_IN_PROGRESS is retried at the same broker.
Every call feeds the broker's circuit (client/circuit.py, the metadata cache's `circuits`): a
retriable failure (unreachable, timed out, overloaded) counts against it, any answer (a final
refusal too) closes it. While the coordinator's circuit is open `call` sends it nothing: it waits for
the probe's time (the backoff between rounds, with jitter, stays as it is), or until its deadline
and raises BrokerUnavailableError; FindCoordinator asks brokers with an open circuit last.

`Heartbeater` is the I/O shell around a `GroupMember` (logbroker/client/group_member.py): a daemon
thread that sends the heartbeats the state machine asks for, one at a time, and feeds back the answers.
It never runs user code; after each answer it calls `on_change()` so the consumer can wake its polling
thread, which applies assignment changes and runs the callbacks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from logbroker.client.backoff import client_retry_policy
from logbroker.client.call_errors import rpc_error
from logbroker.client.group_member import GroupMember, HeartbeatRequest, HeartbeatResponse, MemberState
from logbroker.client.metadata_cache import LogThrottle, MetadataCache, broker_address
from logbroker.clock import Clock, monotonic_s
from logbroker.errors import (
    BrokerError,
    BrokerUnavailableError,
    CoordinatorNotAvailableError,
    LogbrokerError,
    PermissionDeniedError,
    RequestTimedOutError,
    UnauthenticatedError,
    error_for,
)
from logbroker.retry import Backoff
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

# A coordinator that does not answer a heartbeat within this long is treated as gone (find it again):
# well inside any sensible session timeout, so the member heartbeats elsewhere before it is evicted.
HEARTBEAT_TIMEOUT_MS_MAX = 5_000
_FIND_AGAIN = (pb.NOT_COORDINATOR, pb.COORDINATOR_NOT_AVAILABLE)
_RETRY_HERE = (pb.COORDINATOR_LOAD_IN_PROGRESS,)


class CoordinatorClient:
    """The coordinator of one group: found on first use, found again when it moves. Thread-safe."""

    def __init__(self, metadata: MetadataCache, group: str, request_timeout_s: float, retry_backoff_s: float,
                 clock: Clock | None = None) -> None:
        """Deadlines given to `address()` and `call()` are seconds on `clock` (default: the system's
        monotonic clock); `monotonic()` reads it."""
        self.group = group
        self.monotonic = monotonic_s(clock)
        self._metadata = metadata
        self._request_timeout_s = request_timeout_s
        # the waits between FindCoordinator / call rounds: retry_backoff doubling to 1 s, with jitter
        self._retry_policy = client_retry_policy(round(retry_backoff_s * 1000))
        self._lock = threading.Lock()
        self._address: str | None = None
        self._log = LogThrottle(log)

    @property
    def cached_address(self) -> str | None:
        return self._address

    def invalidate(self, address: str | None = None) -> None:
        """Forget the coordinator (only if it is still `address`, when given)."""
        with self._lock:
            if address is None or self._address == address:
                self._address = None

    def address(self, deadline: float) -> str:
        """The coordinator's "host:port"; looks it up (retrying until `deadline`) when not cached.

        At least one lookup is tried even when the deadline has passed.
        """
        addr = self._address
        if addr is not None:
            return addr
        last: LogbrokerError | None = None
        backoff = self._retry_policy.start()
        while True:
            try:
                addr = self._find(min(self._request_timeout_s, max(deadline - self.monotonic(), 1.0)))
            except (BrokerError, BrokerUnavailableError) as e:
                if not getattr(e, "retriable", False):
                    raise
                last = e
            else:
                with self._lock:
                    self._address = addr
                return addr
            wait_s = _retry_wait(backoff, deadline, self.monotonic())
            if wait_s is None:
                raise last
            time.sleep(wait_s)

    def _find(self, timeout_s: float) -> str:
        """One FindCoordinator round over the known brokers (the first that answers decides; those
        whose circuit is open last, client/circuit.py); an overloaded one sends us to the next."""
        request = pb.FindCoordinatorRequest(group=self.group)
        last: grpc.RpcError | None = None
        circuits = self._metadata.circuits
        for candidate in self._metadata.candidate_addresses():
            try:
                resp = self._metadata.broker_stub(candidate).FindCoordinator(request, timeout=timeout_s)
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    circuits.succeeded(candidate)  # a final refusal is an answer
                    raise rpc_error(e) from None
                circuits.failed(candidate, rpc_error(e))
                last = e
                continue
            except ValueError as e:  # a channel closed under us
                raise BrokerUnavailableError(f"client is closed: {e}") from None
            circuits.succeeded(candidate)
            if resp.error_code != pb.NONE:
                raise error_for(resp.error_code, resp.error_message or f"group {self.group}")
            host = resp.host
            if host in ("", "0.0.0.0", "::", "[::]"):
                known = self._metadata.brokers().get(resp.broker_id)
                if known is not None:
                    return known
                host = candidate.rpartition(":")[0]
            return broker_address(host, resp.port)
        raise BrokerUnavailableError(
            f"no broker answered FindCoordinator for group {self.group}: {rpc_error(last) if last else 'no broker'}"
        )

    def call(self, service: str, method: str, request: Any, deadline: float,
             send: Callable[[str, Any, float], Any] | None = None) -> Any:
        """`method` of the "broker" or "admin" service at the coordinator; returns the response.
        `send(address, request, timeout_s)`, when given, makes the call instead of the gRPC stub
        (the record transport; it raises grpc.RpcError as the stub does).

        Retries (until `deadline`, at least once) unreachable coordinators and the top-level codes
        NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE, COORDINATOR_LOAD_IN_PROGRESS; any other top-level
        error code is the caller's to read. Raises the last error when time runs out.
        """
        attempt = 0
        backoff = self._retry_policy.start()
        circuits = self._metadata.circuits
        found_again = False
        while True:
            attempt += 1
            addr: str | None = None
            try:
                addr = self.address(deadline)
                if not circuits.allow(addr):
                    if not found_again:  # the group may have moved to a broker that answers
                        found_again = True
                        self.invalidate(addr)
                        continue
                    self._wait_out_circuit(addr, method, deadline)
                    continue
                timeout = self._request_timeout_s  # the first attempt gets it all, even past the deadline
                if attempt > 1:
                    timeout = min(timeout, max(deadline - self.monotonic(), 1.0))
                if send is not None:
                    resp = send(addr, request, timeout)
                else:
                    stub = self._metadata.admin_stub(addr) if service == "admin" else self._metadata.broker_stub(addr)
                    resp = getattr(stub, method)(request, timeout=timeout)
            except grpc.RpcError as e:
                err: LogbrokerError = rpc_error(e)
                retriable = getattr(err, "retriable", False)
                if addr is not None and retriable:  # the broker's health (client/circuit.py)
                    circuits.failed(addr, err)
                elif addr is not None:  # a final refusal is an answer: the broker is up
                    circuits.succeeded(addr)
                if addr is not None and isinstance(err, (BrokerUnavailableError, RequestTimedOutError)):
                    self.invalidate(addr)
                if not retriable:
                    raise err from None
            except ValueError as e:  # a channel closed under us
                raise BrokerUnavailableError(f"client is closed: {e}") from None
            else:
                circuits.succeeded(addr)
                code = resp.error_code
                if code not in _FIND_AGAIN and code not in _RETRY_HERE:
                    return resp
                err = error_for(code, resp.error_message)
                if code in _FIND_AGAIN:
                    self.invalidate(addr)
            wait_s = _retry_wait(backoff, deadline, self.monotonic())
            if wait_s is None:
                raise err
            self._log.warning(f"{method} {self.group}", "%s for group %s: %s (retrying)", method, self.group, err)
            time.sleep(wait_s)

    def _wait_out_circuit(self, addr: str, method: str, deadline: float) -> None:
        """The coordinator's circuit is open (client/circuit.py): no request to it before its probe's
        time (a call goes to the coordinator or nowhere). Waits until then, or until `deadline` and
        raises BrokerUnavailableError (retriable) when the probe's time is past it."""
        circuits = self._metadata.circuits
        blocked_ms = circuits.blocked_ms(addr)
        wait_s = max(blocked_ms, self._retry_policy.initial_ms) / 1000  # 0: another call's probe is out
        now = self.monotonic()
        if now + wait_s >= deadline:
            time.sleep(max(deadline - now, 0))
            raise BrokerUnavailableError(f"{method} for group {self.group}: the circuit to its coordinator {addr} "
                                         f"is open (no requests to it for {blocked_ms} ms)")
        time.sleep(wait_s)


def _retry_wait(backoff: Backoff, deadline: float, now: float) -> float | None:
    """The wait before the next round, in seconds; None when it would reach `deadline` (`now` on its clock)."""
    wait_ms = backoff.failed()
    if wait_ms is None or now + wait_ms / 1000 >= deadline:
        return None
    return wait_ms / 1000


def heartbeat_request(group: str, req: HeartbeatRequest) -> pb.ConsumerGroupHeartbeatRequest:
    out = pb.ConsumerGroupHeartbeatRequest(
        group=group, member_id=req.member_id, member_epoch=req.member_epoch, assignor=req.assignor,
        session_timeout_ms=req.session_timeout_ms, rebalance_timeout_ms=req.rebalance_timeout_ms,
    )
    if req.subscribed_topics is not None:
        out.subscribed_topics.topics.extend(req.subscribed_topics)
        out.subscribed_topics.SetInParent()  # an empty list is still "set": no topics by name
    if req.subscribed_regex is not None:
        out.subscribed_regex = req.subscribed_regex
    if req.owned is not None:
        out.owned_partitions.SetInParent()
        by_topic: dict[str, list[int]] = {}
        for t, p in req.owned:
            by_topic.setdefault(t, []).append(p)
        for t, parts in by_topic.items():
            out.owned_partitions.topics.add(topic=t, partitions=parts)
    return out


def heartbeat_response(resp: pb.ConsumerGroupHeartbeatResponse) -> HeartbeatResponse:
    if resp.error_code != pb.NONE:
        return HeartbeatResponse(error_for(resp.error_code, resp.error_message))
    assignment = frozenset((tps.topic, p) for tps in resp.assignment.topics for p in tps.partitions)
    return HeartbeatResponse(None, resp.member_id, resp.member_epoch, resp.heartbeat_interval_ms, assignment,
                             resp.session_timeout_ms)


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Heartbeater:
    """The thread that heartbeats for a `GroupMember`; every access to the member holds `lock`."""

    def __init__(
        self,
        member: GroupMember,
        lock: threading.Lock,
        coordinator: CoordinatorClient,
        metadata: MetadataCache,
        on_change: Callable[[], None],
        request_timeout_s: float,
        session_timeout_ms: int = 0,
    ) -> None:
        self._member = member
        self._lock = lock
        self._coordinator = coordinator
        self._metadata = metadata
        self._on_change = on_change
        timeout_ms = min(request_timeout_s * 1000, HEARTBEAT_TIMEOUT_MS_MAX)
        if session_timeout_ms > 0:
            timeout_ms = min(timeout_ms, max(session_timeout_ms / 3, 200))
        self._timeout_s = timeout_ms / 1000
        self._event = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"logbroker-heartbeat-{member.group_id}", daemon=True)
        self._log = LogThrottle(log)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._event.set()

    def stop(self, timeout_s: float | None = None) -> None:
        self._stopped = True
        self._event.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopped:
            self._event.clear()
            now = _monotonic_ms()
            with self._lock:
                before = self._member.state
                req = self._member.next_heartbeat(now)
                wake_ms = self._member.wakeup_ms()
                fenced = before is not MemberState.FENCED and self._member.state is MemberState.FENCED
            if fenced:
                self._on_change()  # fenced for a lapsed session: the poll thread must drop everything
            if req is None:
                wait = None if wake_ms is None else max(wake_ms - now, 0) / 1000
                self._event.wait(1.0 if wait is None else min(wait, 1.0))
                continue
            try:
                self._send(req)
            except Exception:  # never let the thread die silently: the member would be evicted
                log.exception("heartbeat of group %s failed unexpectedly", self._member.group_id)
                with self._lock:
                    self._member.on_failure(LogbrokerError("internal error"), _monotonic_ms())
            self._on_change()

    def _refused(self, err: PermissionDeniedError | UnauthenticatedError) -> None:
        log.error("group %s: %s", self._member.group_id, err)
        with self._lock:
            self._member.on_response(HeartbeatResponse(err), _monotonic_ms())

    def _send(self, req: HeartbeatRequest) -> None:
        group = self._member.group_id
        addr: str | None = None
        try:
            addr = self._coordinator.address(deadline=self._coordinator.monotonic() + self._timeout_s)
            resp = self._metadata.broker_stub(addr).ConsumerGroupHeartbeat(
                heartbeat_request(group, req), timeout=self._timeout_s)
        except grpc.RpcError as e:
            err: LogbrokerError = rpc_error(e)
            if isinstance(err, PermissionDeniedError | UnauthenticatedError):
                self._refused(err)  # ACLs or credentials: no retry fixes it, poll() raises it
                return
            if addr is not None:
                self._coordinator.invalidate(addr)
            self._log.warning(f"hb {group}", "heartbeat of group %s to %s failed: %s", group, addr, err)
            with self._lock:
                self._member.on_failure(err, _monotonic_ms())
            return
        except (PermissionDeniedError, UnauthenticatedError) as e:
            self._refused(e)
            return
        except BrokerError as e:
            self._log.warning(f"find {group}", "coordinator of group %s not found: %s", group, e)
            with self._lock:
                if e.retriable:
                    self._member.on_failure(e, _monotonic_ms())
                else:  # e.g. INVALID_GROUP_ID: as if the coordinator had said it
                    self._member.on_response(HeartbeatResponse(e), _monotonic_ms())
            return
        except (BrokerUnavailableError, ValueError) as e:
            self._log.warning(f"find {group}", "coordinator of group %s not found: %s", group, e)
            with self._lock:
                self._member.on_failure(
                    e if isinstance(e, LogbrokerError) else CoordinatorNotAvailableError(str(e)), _monotonic_ms())
            return
        if resp.error_code in _FIND_AGAIN:
            self._coordinator.invalidate(addr)
        result = heartbeat_response(resp)
        if result.error is not None:
            self._log.warning(f"hb-err {group}", "heartbeat of group %s: %s", group, result.error)
        with self._lock:
            self._member.on_response(result, _monotonic_ms())

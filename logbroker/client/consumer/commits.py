"""Offsets of the group (the commit half of Kafka's `ConsumerCoordinator`): OffsetCommit and
OffsetFetch to the group's coordinator, asynchronous commits in order, auto-commit.

Commits go to the group's coordinator (found with FindCoordinator, followed when it moves), as the
member (id and epoch) when group-managed (`identity`). Auto-commit runs every
`auto_commit_interval_ms` from poll() (asynchronously: never blocking the polling thread; one at a
time), on revocation and on close() (synchronously). Asynchronous commits complete in order: their
callbacks run inside a later poll() (or commit()/close()); at most ASYNC_COMMITS_MAX are in flight.
A synchronous commit first completes every earlier asynchronous one, and retries a stale member
epoch (the heartbeat in flight brings the new one) on the retry policy until its deadline.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc

from logbroker.client.backoff import client_retry_policy
from logbroker.client.call_errors import rpc_error
from logbroker.client.consumer.subscription import PartitionState, SubscriptionState, TopicPartition
from logbroker.client.coordinator import CoordinatorClient
from logbroker.client.metadata_cache import LogThrottle, MetadataCache
from logbroker.clock import Clock
from logbroker.errors import (
    BrokerError,
    BrokerUnavailableError,
    InvalidGroupIdError,
    LogbrokerError,
    StaleMemberEpochError,
    UnknownMemberIdError,
    UnknownTopicOrPartitionError,
    error_for,
)
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

# Asynchronous commits in flight at once; one more waits for the oldest to finish.
ASYNC_COMMITS_MAX = 16

CommitCallback = Callable[[dict[TopicPartition, int], BaseException | None], None]


class AsyncCommit(NamedTuple):
    address: str
    future: Any  # grpc.Future of an OffsetCommitResponse
    offsets: dict[TopicPartition, int]
    callback: CommitCallback | None
    auto: bool  # an auto-commit: failures are logged, not handed to a callback


class AutoCommitTimer:
    """When the next auto-commit is due: every `interval_s` from the last one (pure)."""

    def __init__(self, enabled: bool, interval_s: float, now: float) -> None:
        self.enabled = enabled
        self.interval_s = interval_s
        self.next_at = now + interval_s

    def due(self, now: float) -> bool:
        """True (and the next one scheduled) when an auto-commit is due at `now`."""
        if not self.enabled or now < self.next_at:
            return False
        self.next_at = now + self.interval_s
        return True


class Commits:
    """Commits and committed-offset lookups of one consumer's group (`coordinator` None: no group)."""

    def __init__(self, group: str | None, coordinator: CoordinatorClient | None, cache: MetadataCache,
                 subscription: SubscriptionState, identity: Callable[[], tuple[str, int]],
                 auto_commit: AutoCommitTimer, request_timeout_s: float, retry_backoff_ms: int,
                 clock: Clock, monotonic: Callable[[], float], wake: Callable[[Any], None],
                 throttle: LogThrottle) -> None:
        self.group = group
        self.coordinator = coordinator
        self._cache = cache
        self._subs = subscription
        self._identity = identity
        self.auto = auto_commit
        self._request_timeout_s = request_timeout_s
        self._policy = client_retry_policy(retry_backoff_ms)
        self._clock = clock
        self._monotonic = monotonic
        self._wake = wake
        self._log = throttle
        self.pending: deque[AsyncCommit] = deque()

    def require_group(self) -> CoordinatorClient:
        if self.coordinator is None:
            raise InvalidGroupIdError("this consumer has no group: pass group=... to Consumer() to commit offsets")
        return self.coordinator

    def offset_fetch(self, partitions: list[TopicPartition], deadline: float) -> dict[TopicPartition, int]:
        """The group's committed offsets of `partitions` (absent: nothing committed)."""
        coordinator = self.require_group()
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

    def _request(self, offsets: dict[TopicPartition, int]) -> pb.OffsetCommitRequest:
        member_id, epoch = self._identity()
        return pb.OffsetCommitRequest(
            group=self.group, member_id=member_id, member_epoch=epoch,
            partitions=[pb.OffsetCommitPartition(topic=t, partition=p, offset=off) for (t, p), off in offsets.items()],
        )

    def commit(self, offsets: dict[TopicPartition, int], asynchronous: bool, callback: CommitCallback | None) -> None:
        """Consumer.commit() once the offsets are known (see there)."""
        coordinator = self.require_group()
        if not offsets:
            if callback is not None:
                callback({}, None)
            return
        if asynchronous:
            self.commit_async(coordinator, offsets, callback, auto=False)
            return
        try:
            self.commit_sync(coordinator, offsets, self._monotonic() + self._request_timeout_s)
        except LogbrokerError as e:
            if callback is not None:
                callback(offsets, e)
            raise
        if callback is not None:
            callback(offsets, None)

    def commit_sync(self, coordinator: CoordinatorClient, offsets: dict[TopicPartition, int], deadline: float) -> None:
        self.finish_async(block_until=deadline)  # never overtake an earlier commit
        backoff = self._policy.start(int(deadline * 1000), self._clock)
        while True:
            resp = coordinator.call("broker", "OffsetCommit", self._request(offsets), deadline)
            if resp.error_code == pb.STALE_MEMBER_EPOCH:
                wait_ms = backoff.failed()
                if wait_ms is not None and self._monotonic() + wait_ms / 1000 < deadline:
                    time.sleep(wait_ms / 1000)  # the heartbeat that moved the epoch is on its way back
                    continue
            break
        err = self._outcome(offsets, resp)
        if err is not None:
            raise err

    def _outcome(self, offsets: dict[TopicPartition, int], resp: pb.OffsetCommitResponse) -> BrokerError | None:
        """Record what a commit response accepted; the error to report (top-level, else the first)."""
        if resp.error_code != pb.NONE:
            err = error_for(resp.error_code, resp.error_message or f"group {self.group}")
            if isinstance(err, StaleMemberEpochError | UnknownMemberIdError):
                err.message += " (nothing was committed)"
            return err
        first: BrokerError | None = None
        assigned = self._subs.assigned
        for r in resp.results:
            if r.error_code != pb.NONE:
                first = first or error_for(r.error_code, f"{r.topic}-{r.partition}: {r.error_message}")
                continue
            st = assigned.get((r.topic, r.partition))
            if st is not None:
                st.committed = offsets.get((r.topic, r.partition), st.committed)
        return first

    def commit_async(self, coordinator: CoordinatorClient, offsets: dict[TopicPartition, int],
                     callback: CommitCallback | None, auto: bool) -> None:
        if len(self.pending) >= ASYNC_COMMITS_MAX:
            self.finish_async(block_until=self._monotonic() + self._request_timeout_s, at_most=1)
        try:
            request = self._request(offsets)
            address = coordinator.cached_address or coordinator.address(deadline=self._monotonic())  # one lookup
            future = self._cache.broker_stub(address).OffsetCommit.future(request, timeout=self._request_timeout_s)
        except (LogbrokerError, grpc.RpcError, ValueError) as e:
            err = e if isinstance(e, LogbrokerError) else BrokerUnavailableError(str(e))
            if isinstance(e, grpc.RpcError):
                err = rpc_error(e)
            self._failed(offsets, callback, auto, err)
            return
        self.pending.append(AsyncCommit(address, future, offsets, callback, auto))
        future.add_done_callback(self._wake)  # wakes poll()

    def finish_async(self, block_until: float | None, at_most: int | None = None) -> None:
        """Complete asynchronous commits in order: those done (or, with `block_until`, every one, waiting
        until then at most); their callbacks run here."""
        done = 0
        while self.pending and (at_most is None or done < at_most):
            commit = self.pending[0]
            if not commit.future.done():
                if block_until is None:
                    return
                with contextlib.suppress(Exception):  # the outcome is read below
                    commit.future.result(timeout=max(block_until - self._monotonic(), 0))
                if not commit.future.done():
                    return
            self.pending.popleft()
            done += 1
            self._complete(commit)

    def _complete(self, commit: AsyncCommit) -> None:
        try:
            resp = commit.future.result()
        except grpc.RpcError as e:
            self._coordinator_failed(commit.address)
            self._failed(commit.offsets, commit.callback, commit.auto, rpc_error(e))
            return
        except Exception as e:  # cancelled
            self._failed(commit.offsets, commit.callback, commit.auto, LogbrokerError(f"commit: {e!r}"))
            return
        if resp.error_code in (pb.NOT_COORDINATOR, pb.COORDINATOR_NOT_AVAILABLE):
            self._coordinator_failed(commit.address)
        err = self._outcome(commit.offsets, resp)
        if err is not None:
            self._failed(commit.offsets, commit.callback, commit.auto, err)
        elif commit.callback is not None:
            commit.callback(commit.offsets, None)

    def _coordinator_failed(self, address: str) -> None:
        if self.coordinator is not None:
            self.coordinator.invalidate(address)

    def _failed(self, offsets: dict[TopicPartition, int], callback: CommitCallback | None, auto: bool,
                err: LogbrokerError) -> None:
        if callback is not None:
            callback(offsets, err)
        else:
            self._log.warning("commit", "%scommit of group %s failed: %s", "auto-" if auto else "async ",
                              self.group, err)

    def commit_quietly(self, states: list[PartitionState], asynchronous: bool) -> None:
        """Auto-commit: positions that moved since the last commit; failures are logged."""
        offsets = self._subs.uncommitted(states)
        if not offsets or self.coordinator is None:
            return
        if asynchronous:
            self.commit_async(self.coordinator, offsets, None, auto=True)
            return
        try:
            self.commit_sync(self.coordinator, offsets, self._monotonic() + self._request_timeout_s)
        except LogbrokerError as e:
            self._log.warning("commit", "auto-commit of group %s failed: %s", self.group, e)

    def maybe_auto_commit(self, now: float) -> None:
        """poll()'s housekeeping: complete finished async commits; auto-commit when due (unless the
        last auto-commit is still on its way)."""
        if self.pending:
            self.finish_async(block_until=None)
        if self.auto.due(now) and not any(c.auto for c in self.pending):
            self.commit_quietly(list(self._subs.assigned.values()), asynchronous=True)

    def cancel(self) -> None:
        for commit in self.pending:
            commit.future.cancel()
        self.pending.clear()

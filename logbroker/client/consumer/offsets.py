"""Start positions (Kafka's `OffsetFetcher` and position reset): partitions without a position start
at the group's committed offset, else where `auto_offset_reset` says (ListOffsets to the leaders for
the earliest or latest offset); seek_to_beginning / seek_to_end look offsets up the same way.

Lookups retry retriable errors on the one retry policy (logbroker/client/backoff.py: retry_backoff_ms
doubling to 1 s, jittered) until their deadline; poll() gives a deadline of now (one attempt: it must
not block) and backs the failed partitions off for retry_backoff_ms instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import grpc

from logbroker.client.backoff import client_retry_policy
from logbroker.client.call_errors import rpc_error
from logbroker.client.consumer.metadata import ConsumerMetadata
from logbroker.client.consumer.subscription import PartitionState, SubscriptionState, TopicPartition
from logbroker.client.metadata_cache import LogThrottle
from logbroker.clock import Clock
from logbroker.errors import (
    BrokerError,
    BrokerUnavailableError,
    LeaderNotAvailableError,
    LogbrokerError,
    OffsetOutOfRangeError,
    UnknownTopicOrPartitionError,
    error_for,
)
from logbroker.v1 import logbroker_pb2 as pb

# The group's committed offsets of these partitions (absent: none committed), until a deadline.
CommittedLookup = Callable[[list[TopicPartition], float], dict[TopicPartition, int]]


class OffsetLookup:
    def __init__(self, subscription: SubscriptionState, metadata: ConsumerMetadata, reset: int | None,
                 committed: CommittedLookup | None, request_timeout_s: float, retry_backoff_ms: int,
                 clock: Clock, monotonic: Callable[[], float], throttle: LogThrottle) -> None:
        self._subs = subscription
        self._md = metadata
        self._reset = reset
        self._committed = committed  # None: no group
        self._request_timeout_s = request_timeout_s
        self._retry_backoff_s = retry_backoff_ms / 1000
        self._policy = client_retry_policy(retry_backoff_ms)
        self._clock = clock
        self._monotonic = monotonic
        self._log = throttle

    def initialize_positions(self, now: float) -> None:
        """Positions for partitions without one: committed offset (with a group), else reset.

        Partitions whose lookup fails with a retriable error back off for retry_backoff_ms.
        """
        missing = self._subs.missing_positions(now)
        if missing:
            try:
                self.initialize(missing, deadline=now)  # one attempt: poll() must not block on it
            except (BrokerError, BrokerUnavailableError) as e:
                if not getattr(e, "retriable", False):
                    raise
                self._log.warning("offsets", "looking up start offsets failed: %s", e)
                for st in missing:
                    st.retry_at = self._monotonic() + self._retry_backoff_s
                self._md.stale = True
        self._subs.update_need_positions()

    def initialize(self, missing: list[PartitionState], deadline: float) -> None:
        if self._committed is not None:
            fresh = [st for st in missing if st.reset_to is None]
            if fresh:
                committed = self._committed([(st.topic, st.partition) for st in fresh], deadline)
                for st in fresh:
                    off = committed.get((st.topic, st.partition), -1)
                    if off >= 0:
                        st.seek(off)
                        st.committed = off
        by_reset: dict[int, list[PartitionState]] = {}
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
            offsets = self.list_offsets(states, strategy, deadline)
            for st in states:
                st.seek(offsets[(st.topic, st.partition)])

    def seek_to(self, states: list[PartitionState], timestamp: int) -> None:
        """Seek to the offsets ListOffsets gives for `timestamp` (EARLIEST, LATEST)."""
        offsets = self.list_offsets(states, timestamp, deadline=self._monotonic() + self._request_timeout_s)
        for st in states:
            st.seek(offsets[(st.topic, st.partition)])

    def list_offsets(self, states: list[PartitionState], timestamp: int, deadline: float) -> dict[TopicPartition, int]:
        """ListOffsets to each partition's leader; retries retriable errors until `deadline`."""
        out: dict[TopicPartition, int] = {}
        todo = list(states)
        backoff = self._policy.start(int(deadline * 1000), self._clock)
        while todo:
            by_leader, retry, last = self._by_leader(todo)
            for address, group in by_leader.items():
                last = self._list_offsets_at(address, group, timestamp, out, retry) or last
            todo = retry
            if todo:
                wait_ms = backoff.failed()
                if wait_ms is None:
                    raise last if last is not None else BrokerUnavailableError("ListOffsets found no offset")
                time.sleep(wait_ms / 1000)
                with contextlib.suppress(LogbrokerError):
                    self._md.cache.refresh([st.topic for st in todo], retry=False)
        return out

    def _by_leader(self, states: list[PartitionState]
                   ) -> tuple[dict[str, list[PartitionState]], list[PartitionState], BaseException | None]:
        """The partitions by leader; those without one (to retry), and why."""
        by_leader: dict[str, list[PartitionState]] = {}
        retry: list[PartitionState] = []
        last: BaseException | None = None
        for st in states:
            try:
                leader = self._md.cache.leader(st.topic, st.partition)
            except UnknownTopicOrPartitionError as e:
                leader, last = None, e
            if leader is None:
                last = last or LeaderNotAvailableError(f"{st.topic}-{st.partition} has no leader")
                retry.append(st)
                continue
            by_leader.setdefault(leader, []).append(st)
        return by_leader, retry, last

    def _list_offsets_at(self, address: str, group: list[PartitionState], timestamp: int,
                         out: dict[TopicPartition, int], retry: list[PartitionState]) -> BaseException | None:
        """One ListOffsets to one leader: offsets into `out`, retriable failures into `retry`; the
        last retriable error (non-retriable ones are raised)."""
        request = pb.ListOffsetsRequest(partitions=[
            pb.ListOffsetsPartition(topic=st.topic, partition=st.partition, timestamp=timestamp) for st in group
        ])
        try:
            resp = self._md.cache.broker_stub(address).ListOffsets(request, timeout=self._request_timeout_s)
        except grpc.RpcError as e:
            err = rpc_error(e)
            if not getattr(err, "retriable", False):
                raise err from None
            retry.extend(group)
            return err
        last: BaseException | None = None
        results = {(r.topic, r.partition): r for r in resp.results}
        for st in group:
            r = results.get((st.topic, st.partition))
            if r is None:
                retry.append(st)
                continue
            if r.error_code != pb.NONE:
                error = error_for(r.error_code, r.error_message)
                if not error.retriable:
                    raise error
                last = error
                retry.append(st)
                continue
            out[(st.topic, st.partition)] = max(r.offset, 0)
        return last

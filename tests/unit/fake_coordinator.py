"""An in-memory group coordinator for client unit tests (no sockets).

It wraps the broker's own pure membership state machine (`logbroker.group.membership.Group`) over a
`FakeMetadata`'s topics, and installs FindCoordinator, ConsumerGroupHeartbeat, OffsetCommit and
OffsetFetch on the fake broker 0 (and DescribeGroup, DeleteGroup, ListGroups on its Admin service):
the client under test talks to the real membership semantics. Errors can be scripted per call.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from logbroker.clock import SYSTEM_CLOCK, Clock
from logbroker.group.assignor import ASSIGNORS
from logbroker.group.membership import Group
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.test_client_fakes import FakeBroker, FakeMetadata, _Method

TopicPartition = tuple[str, int]


class FakeCoordinator:
    def __init__(self, md: FakeMetadata, *, clock: Clock = SYSTEM_CLOCK, session_timeout_ms: int = 10_000,
                 rebalance_timeout_ms: int = 10_000, heartbeat_interval_ms: int = 20) -> None:
        self.md = md
        self.clock = clock
        self.session_timeout_ms = session_timeout_ms
        self.rebalance_timeout_ms = rebalance_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.lock = threading.RLock()
        self.groups: dict[str, Group] = {}
        self.committed: dict[str, dict[TopicPartition, int]] = {}
        self.heartbeats: list[pb.ConsumerGroupHeartbeatRequest] = []
        self.commits: list[pb.OffsetCommitRequest] = []
        self.heartbeat_errors: deque[int] = deque()  # top-level codes for the next heartbeats
        self.commit_errors: deque[int] = deque()
        self.find_errors: deque[int] = deque()
        broker: FakeBroker = md.broker
        broker.FindCoordinator = _Method(self.find_coordinator, broker)  # type: ignore[attr-defined]
        broker.ConsumerGroupHeartbeat = _Method(self.heartbeat, broker)  # type: ignore[attr-defined]
        broker.OffsetCommit = _Method(self.offset_commit, broker)
        broker.OffsetFetch = _Method(self.offset_fetch, broker)
        admin = md.admin_stub("broker0:9092")
        admin.ListGroups = self.list_groups
        admin.DescribeGroup = self.describe_group
        admin.DeleteGroup = self.delete_group

    # -- views for assertions -----------------------------------------------------------------

    def members(self, group: str) -> dict[str, set[TopicPartition]]:
        """member id -> what it may own now (assigned + revoking)."""
        with self.lock:
            g = self.groups.get(group)
            if g is None:
                return {}
            g.expire()
            return {m.member_id: set(m.assigned) | set(m.revoking) for m in g.describe().members}

    def epoch_of(self, group: str, member_id: str) -> int:
        with self.lock:
            for m in self.groups[group].describe().members:
                if m.member_id == member_id:
                    return m.member_epoch
        raise KeyError(member_id)

    def evict(self, group: str, member_id: str) -> None:
        """As if the session had timed out: the member's next heartbeat gets UNKNOWN_MEMBER_ID."""
        with self.lock:
            g = self.groups[group]
            g.heartbeat(member_id, -1)

    # -- Broker service -----------------------------------------------------------------------

    def find_coordinator(self, req: pb.FindCoordinatorRequest) -> pb.FindCoordinatorResponse:
        if self.find_errors:
            return pb.FindCoordinatorResponse(error_code=self.find_errors.popleft())  # type: ignore[arg-type]
        return pb.FindCoordinatorResponse(broker_id=0, host="broker0", port=9092)

    def heartbeat(self, req: pb.ConsumerGroupHeartbeatRequest) -> pb.ConsumerGroupHeartbeatResponse:
        with self.lock:
            self.heartbeats.append(req)
            if self.heartbeat_errors:
                return pb.ConsumerGroupHeartbeatResponse(error_code=self.heartbeat_errors.popleft())  # type: ignore[arg-type]
            g = self.groups.get(req.group)
            if g is None:
                g = self.groups[req.group] = Group(
                    req.group, ASSIGNORS[req.assignor or "sticky"](), self.clock,
                    session_timeout_ms=req.session_timeout_ms or self.session_timeout_ms,
                    rebalance_timeout_ms=req.rebalance_timeout_ms or self.rebalance_timeout_ms,
                )
            g.expire()
            owned = None
            if req.HasField("owned_partitions"):
                owned = [(t.topic, p) for t in req.owned_partitions.topics for p in t.partitions]
            result = g.heartbeat(
                req.member_id, req.member_epoch,
                subscribed_topics=list(req.subscribed_topics.topics) if req.HasField("subscribed_topics") else None,
                subscribed_regex=req.subscribed_regex if req.HasField("subscribed_regex") else None,
                owned_partitions=owned,
                topic_partition_counts=dict(self.md.topic_partitions),
            )
            if result.error is not None:
                return pb.ConsumerGroupHeartbeatResponse(error_code=result.error.code,  # type: ignore[arg-type]
                                                         error_message=result.error.message)
            resp = pb.ConsumerGroupHeartbeatResponse(member_id=result.member_id, member_epoch=result.member_epoch,
                                                     heartbeat_interval_ms=self.heartbeat_interval_ms)
            by_topic: dict[str, list[int]] = {}
            for t, p in sorted(result.assignment):
                by_topic.setdefault(t, []).append(p)
            for t, parts in by_topic.items():
                resp.assignment.topics.add(topic=t, partitions=parts)
            return resp

    def offset_commit(self, req: pb.OffsetCommitRequest) -> pb.OffsetCommitResponse:
        with self.lock:
            self.commits.append(req)
            if self.commit_errors:
                return pb.OffsetCommitResponse(error_code=self.commit_errors.popleft())  # type: ignore[arg-type]
            g = self.groups.get(req.group)
            if g is not None:
                g.expire()
                err = g.commit_error(req.member_id, req.member_epoch)
                if err is not None:
                    return pb.OffsetCommitResponse(error_code=err.code, error_message=err.message)  # type: ignore[arg-type]
            elif req.member_id:
                return pb.OffsetCommitResponse(error_code=pb.UNKNOWN_MEMBER_ID, error_message="no such group")
            out = pb.OffsetCommitResponse()
            stored = self.committed.setdefault(req.group, {})
            for p in req.partitions:
                n = self.md.topic_partitions.get(p.topic)
                if n is None or not 0 <= p.partition < n:
                    out.results.add(topic=p.topic, partition=p.partition, error_code=pb.UNKNOWN_TOPIC_OR_PARTITION)
                elif not 0 <= p.offset <= self.md.broker.next_offset.get((p.topic, p.partition), 0):
                    out.results.add(topic=p.topic, partition=p.partition, error_code=pb.OFFSET_OUT_OF_RANGE)
                else:
                    stored[(p.topic, p.partition)] = p.offset
                    out.results.add(topic=p.topic, partition=p.partition)
            return out

    def offset_fetch(self, req: pb.OffsetFetchRequest) -> pb.OffsetFetchResponse:
        with self.lock:
            stored = self.committed.get(req.group, {})
            out = pb.OffsetFetchResponse()
            wanted = [(tp.topic, tp.partition) for tp in req.partitions] or sorted(stored)
            for t, p in wanted:
                out.results.add(topic=t, partition=p, offset=stored.get((t, p), -1))
            return out

    # -- Admin service ------------------------------------------------------------------------

    def list_groups(self, req: pb.ListGroupsRequest, timeout: float | None = None) -> pb.ListGroupsResponse:
        with self.lock:
            out = pb.ListGroupsResponse()
            for name in sorted(set(self.groups) | set(self.committed)):
                g = self.groups.get(name)
                state = g.state.value if g is not None else "empty"
                out.groups.add(group=name, state=state, members=len(g.describe().members) if g else 0)
            return out

    def describe_group(self, req: pb.DescribeGroupRequest, timeout: float | None = None) -> pb.DescribeGroupResponse:
        with self.lock:
            g = self.groups.get(req.group)
            if g is None and req.group not in self.committed:
                return pb.DescribeGroupResponse(error_code=pb.GROUP_ID_NOT_FOUND, error_message=req.group)
            out = pb.DescribeGroupResponse(group=req.group, state="empty", coordinator_id=0)
            if g is not None:
                d = g.describe()
                out.state, out.group_epoch, out.assignor = d.state.value, d.group_epoch, d.assignor
                for m in d.members:
                    md = out.members.add(member_id=m.member_id, member_epoch=m.member_epoch, state=m.state.value,
                                         subscribed_topics=m.subscribed_topics, subscribed_regex=m.subscribed_regex,
                                         client_host="127.0.0.1")
                    for field, tps in (("assigned", m.assigned), ("revoking", m.revoking), ("target", m.target)):
                        by_topic: dict[str, list[int]] = {}
                        for t, p in tps:
                            by_topic.setdefault(t, []).append(p)
                        for t, parts in by_topic.items():
                            getattr(md, field).topics.add(topic=t, partitions=parts)
            for (t, p), off in sorted(self.committed.get(req.group, {}).items()):
                out.offsets.add(topic=t, partition=p, offset=off, commit_timestamp_ms=1)
            return out

    def delete_group(self, req: pb.DeleteGroupRequest, timeout: float | None = None) -> pb.DeleteGroupResponse:
        with self.lock:
            g = self.groups.get(req.group)
            if g is None and req.group not in self.committed:
                return pb.DeleteGroupResponse(error_code=pb.GROUP_ID_NOT_FOUND, error_message=req.group)
            if g is not None and g.describe().members:
                return pb.DeleteGroupResponse(error_code=pb.NON_EMPTY_GROUP, error_message=f"{req.group} has members")
            self.groups.pop(req.group, None)
            self.committed.pop(req.group, None)
            return pb.DeleteGroupResponse()


def install(md: FakeMetadata, **kw: Any) -> FakeCoordinator:
    return FakeCoordinator(md, **kw)

"""Consumer-group calls: offset commit and fetch, FindCoordinator, heartbeats, and the group admin
calls (list, describe, delete), each answered by this broker's group coordinator for the groups it
coordinates (`GroupCalls`; group/coordinator.py implements it)."""

from __future__ import annotations

from typing import Protocol

from logbroker.server.request_checks import ServingState, as_error, check_count, check_ready
from logbroker.server.request_context import RequestContext
from logbroker.v1 import logbroker_pb2 as pb


class GroupCalls(Protocol):
    async def commit(self, req: pb.OffsetCommitRequest) -> pb.OffsetCommitResponse: ...

    def fetch(self, req: pb.OffsetFetchRequest) -> pb.OffsetFetchResponse: ...

    async def find_coordinator(self, group: str) -> pb.BrokerInfo: ...

    async def heartbeat(self, req: pb.ConsumerGroupHeartbeatRequest) -> pb.ConsumerGroupHeartbeatResponse: ...

    def list_groups(self) -> pb.ListGroupsResponse: ...

    def describe(self, group: str) -> pb.DescribeGroupResponse: ...

    async def delete(self, group: str) -> pb.DeleteGroupResponse: ...


class GroupApis:
    def __init__(self, state: ServingState, coordinator: GroupCalls) -> None:
        self._state = state
        self._coordinator = coordinator

    async def offset_commit(self, context: RequestContext, req: pb.OffsetCommitRequest) -> pb.OffsetCommitResponse:
        check_ready(self._state)
        check_count(len(req.partitions), "partitions")
        return await self._coordinator.commit(req)

    async def offset_fetch(self, context: RequestContext, req: pb.OffsetFetchRequest) -> pb.OffsetFetchResponse:
        check_ready(self._state)
        check_count(len(req.partitions), "partitions")
        return self._coordinator.fetch(req)

    async def find_coordinator(self, context: RequestContext,
                               req: pb.FindCoordinatorRequest) -> pb.FindCoordinatorResponse:
        check_ready(self._state)
        resp = pb.FindCoordinatorResponse(broker_id=-1)
        try:
            b = await self._coordinator.find_coordinator(req.group)
            resp.broker_id, resp.host, resp.port = b.broker_id, b.host, b.port
        except Exception as exc:
            err = as_error(exc, "find_coordinator")
            resp.error_code = err.code  # type: ignore[assignment]
            resp.error_message = err.message
        return resp

    async def consumer_group_heartbeat(self, context: RequestContext,
                                       req: pb.ConsumerGroupHeartbeatRequest) -> pb.ConsumerGroupHeartbeatResponse:
        check_ready(self._state)
        return await self._coordinator.heartbeat(req)

    async def list_groups(self, context: RequestContext, req: pb.ListGroupsRequest) -> pb.ListGroupsResponse:
        check_ready(self._state)
        return self._coordinator.list_groups()

    async def describe_group(self, context: RequestContext, req: pb.DescribeGroupRequest) -> pb.DescribeGroupResponse:
        check_ready(self._state)
        return self._coordinator.describe(req.group)

    async def delete_group(self, context: RequestContext, req: pb.DeleteGroupRequest) -> pb.DeleteGroupResponse:
        check_ready(self._state)
        return await self._coordinator.delete(req.group)

"""Share-group (queue) calls: ShareFetch and ShareAcknowledge (Broker service), and the share-group
admin calls (alter, list, describe, purge; Admin service), each answered by this broker's share
coordinator for the groups it coordinates (`ShareCalls`; group/share_coordinator.py implements it)."""

from __future__ import annotations

from typing import Protocol

from logbroker.server.active_clients import CONSUMERS, ActiveClients, seen_by
from logbroker.server.request_checks import ServingState, check_count, check_ready
from logbroker.server.request_context import RequestContext
from logbroker.v1 import logbroker_pb2 as pb


class ShareCalls(Protocol):
    async def share_fetch(self, req: pb.ShareFetchRequest) -> pb.ShareFetchResponse: ...

    async def share_acknowledge(self, req: pb.ShareAcknowledgeRequest) -> pb.ShareAcknowledgeResponse: ...

    async def alter(self, req: pb.AlterShareGroupRequest) -> pb.AlterShareGroupResponse: ...

    def list_groups(self) -> pb.ListShareGroupsResponse: ...

    async def describe(self, req: pb.DescribeShareGroupRequest) -> pb.DescribeShareGroupResponse: ...

    async def purge(self, req: pb.PurgeShareGroupRequest) -> pb.PurgeShareGroupResponse: ...


class QueueApis:
    def __init__(self, state: ServingState, coordinator: ShareCalls, active_clients: ActiveClients | None = None) -> None:
        self._state = state
        self._coordinator = coordinator
        self._active_clients = active_clients  # told who share-fetched which topics (server/active_clients.py)

    async def share_fetch(self, context: RequestContext, req: pb.ShareFetchRequest) -> pb.ShareFetchResponse:
        check_ready(self._state)
        check_count(len(req.acknowledgements), "acknowledgements")
        resp = await self._coordinator.share_fetch(req)
        if self._active_clients is not None:
            topics = {p.topic for p in resp.partitions} | {a.topic for a in req.acknowledgements}
            seen_by(self._active_clients, CONSUMERS, context, topics)
        return resp

    async def share_acknowledge(self, context: RequestContext,
                                req: pb.ShareAcknowledgeRequest) -> pb.ShareAcknowledgeResponse:
        check_ready(self._state)
        check_count(len(req.acknowledgements), "acknowledgements")
        return await self._coordinator.share_acknowledge(req)

    async def alter_share_group(self, context: RequestContext,
                                req: pb.AlterShareGroupRequest) -> pb.AlterShareGroupResponse:
        check_ready(self._state)
        return await self._coordinator.alter(req)

    async def list_share_groups(self, context: RequestContext,
                                req: pb.ListShareGroupsRequest) -> pb.ListShareGroupsResponse:
        check_ready(self._state)
        return self._coordinator.list_groups()

    async def describe_share_group(self, context: RequestContext,
                                   req: pb.DescribeShareGroupRequest) -> pb.DescribeShareGroupResponse:
        check_ready(self._state)
        return await self._coordinator.describe(req)

    async def purge_share_group(self, context: RequestContext,
                                req: pb.PurgeShareGroupRequest) -> pb.PurgeShareGroupResponse:
        check_ready(self._state)
        check_count(len(req.topics), "topics")
        return await self._coordinator.purge(req)

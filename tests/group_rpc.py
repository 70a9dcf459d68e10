"""Raw gRPC calls to a consumer group's coordinator for tests (no client library), following the
coordinator when it moves."""

from __future__ import annotations

import time

import grpc

from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg

RETRIABLE = (pb.NOT_COORDINATOR, pb.COORDINATOR_NOT_AVAILABLE, pb.COORDINATOR_LOAD_IN_PROGRESS,
             pb.REQUEST_TIMED_OUT, pb.NOT_ENOUGH_REPLICAS)


class GroupRpc:
    """Raw calls to a group's coordinator, following it when it moves."""

    def __init__(self, bootstrap: list[str], group: str) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.address = ""
        self.broker_id = -1

    def _broker(self, address: str) -> pbg.BrokerStub:
        return pbg.BrokerStub(grpc.insecure_channel(address))

    def find(self, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            for address in self.bootstrap:
                try:
                    r = self._broker(address).FindCoordinator(pb.FindCoordinatorRequest(group=self.group), timeout=5)
                except grpc.RpcError:
                    continue
                if r.error_code == pb.NONE:
                    self.address, self.broker_id = f"{r.host}:{r.port}", r.broker_id
                    return self.address
            if time.monotonic() > deadline:
                raise AssertionError(f"no coordinator for {self.group} within {timeout_s} s")
            time.sleep(0.1)

    def call(self, method: str, request: object, timeout_s: float = 30.0, admin: bool = False) -> object:
        """Call the coordinator, finding it again on coordinator errors or a dead broker."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.address:
                self.find(max(0.1, deadline - time.monotonic()))
            try:
                stub = pbg.AdminStub(grpc.insecure_channel(self.address)) if admin else self._broker(self.address)
                resp = getattr(stub, method)(request, timeout=5)
            except grpc.RpcError:
                resp = None
            code = getattr(resp, "error_code", pb.NONE) if resp is not None else pb.NOT_COORDINATOR
            if code not in RETRIABLE:
                return resp
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} kept failing: {resp}")
            self.address = ""
            time.sleep(0.1)

    def heartbeat(self, **fields: object) -> pb.ConsumerGroupHeartbeatResponse:
        r = self.call("ConsumerGroupHeartbeat", pb.ConsumerGroupHeartbeatRequest(group=self.group, **fields))
        assert isinstance(r, pb.ConsumerGroupHeartbeatResponse)
        return r

    def commit(self, offsets: dict[tuple[str, int], int], member_id: str = "", member_epoch: int = 0,
               ) -> pb.OffsetCommitResponse:
        r = self.call("OffsetCommit", pb.OffsetCommitRequest(
            group=self.group, member_id=member_id, member_epoch=member_epoch,
            partitions=[pb.OffsetCommitPartition(topic=t, partition=p, offset=o) for (t, p), o in offsets.items()]))
        assert isinstance(r, pb.OffsetCommitResponse)
        return r

    def committed(self) -> dict[tuple[str, int], int]:
        r = self.call("OffsetFetch", pb.OffsetFetchRequest(group=self.group))
        assert isinstance(r, pb.OffsetFetchResponse) and r.error_code == pb.NONE, r
        return {(x.topic, x.partition): x.offset for x in r.results}

    def members(self) -> list[str]:
        """Member ids the coordinator lists (none for a group it does not know)."""
        r = self.call("DescribeGroup", pb.DescribeGroupRequest(group=self.group), admin=True)
        assert isinstance(r, pb.DescribeGroupResponse) and r.error_code in (pb.NONE, pb.GROUP_ID_NOT_FOUND), r
        return [m.member_id for m in r.members]

"""gRPC channels from this broker to the others: the controller's calls and, via the same cache,
anything else broker-to-broker. One `grpc.aio` channel per address, closed on shutdown. Every call
made through them carries the cluster secret (`call_metadata`; logbroker/cluster/cluster_secret.py)."""

from __future__ import annotations

import grpc

from logbroker.cluster.cluster_secret import CallMetadata, call_metadata
from logbroker.cluster.metadata import BrokerRegistration
from logbroker.cluster.metadata_image import MetadataImage
from logbroker.server.reply_registry import unknown_reply_to
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 10_000),
]
CONTROLLER_CALL_TIMEOUT_S = 10.0
FORWARD_REPLY_TIMEOUT_S = 5.0


class BrokerChannels:
    """Implements the controller's `ControllerRpc` over the `Replica` service."""

    def __init__(self, cluster_secret: bytes = b"") -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.call_metadata: CallMetadata = call_metadata(cluster_secret)

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = ch
        return ch

    def stub(self, address: str) -> pbg.ReplicaStub:
        return pbg.ReplicaStub(self._channel(address))

    def broker_stub(self, address: str) -> pbg.BrokerStub:
        """The Broker service of another broker (the group coordinator asks leaders for high watermarks)."""
        return pbg.BrokerStub(self._channel(address))

    async def leader_and_isr(self, broker: BrokerRegistration, req: pb.LeaderAndIsrRequest) -> pb.LeaderAndIsrResponse:
        resp: pb.LeaderAndIsrResponse = await self.stub(broker.address).LeaderAndIsr(
            req, timeout=CONTROLLER_CALL_TIMEOUT_S, metadata=self.call_metadata)
        return resp

    async def update_metadata(self, broker: BrokerRegistration, req: pb.UpdateMetadataRequest) -> pb.UpdateMetadataResponse:
        resp: pb.UpdateMetadataResponse = await self.stub(broker.address).UpdateMetadata(
            req, timeout=CONTROLLER_CALL_TIMEOUT_S, metadata=self.call_metadata)
        return resp

    async def stop_replica(self, broker: BrokerRegistration, req: pb.StopReplicaRequest) -> pb.StopReplicaResponse:
        resp: pb.StopReplicaResponse = await self.stub(broker.address).StopReplica(
            req, timeout=CONTROLLER_CALL_TIMEOUT_S, metadata=self.call_metadata)
        return resp

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()


class ReplyForwarding:
    """Replies for another broker's reply streams, sent to its Replica.ForwardReply (apis/replies.py's
    `ReplyForwarder`): the broker's address from the controller's last metadata."""

    def __init__(self, channels: BrokerChannels, image: MetadataImage) -> None:
        self._channels = channels
        self._image = image

    async def forward_reply(self, broker_id: int, req: pb.ReplyRequest) -> pb.ReplyResponse:
        address = self._image.broker_address(broker_id)
        if address is None:
            return unknown_reply_to(req.reply_to, f"names broker {broker_id}, which is not a live broker of this cluster")
        try:
            resp: pb.ReplyResponse = await self._channels.stub(address).ForwardReply(
                req, timeout=FORWARD_REPLY_TIMEOUT_S, metadata=self._channels.call_metadata)
        except grpc.RpcError as e:
            return pb.ReplyResponse(error_code=pb.BROKER_NOT_AVAILABLE,
                                    error_message=f"forwarding the reply to broker {broker_id} at {address} failed: "
                                                  f"{e.code().name}")
        return resp

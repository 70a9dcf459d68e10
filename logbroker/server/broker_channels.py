"""gRPC channels from this broker to the others: the controller's calls and, via the same cache,
anything else broker-to-broker. One `grpc.aio` channel per address, closed on shutdown. Every call
made through them speaks TLS when the broker does (presenting its own certificate) and carries the cluster secret (`call_metadata`; logbroker/cluster/cluster_secret.py)."""

from __future__ import annotations

import asyncio

import grpc

from logbroker.cluster.cluster_secret import CallMetadata, call_metadata
from logbroker.cluster.metadata import BrokerRegistration
from logbroker.cluster.metadata_image import MetadataImage
from logbroker.server.reply_registry import unknown_reply_to
from logbroker.tls import RotationCheck, TlsConfig, aio_channel
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

    def __init__(self, cluster_secret: bytes = b"", tls: TlsConfig | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tls = tls  # the broker's own certificate as the client's (mTLS between brokers)
        self._rotation = RotationCheck(tls)
        self._retiring: set[asyncio.Task[None]] = set()  # closes of channels opened before a rotation
        self.call_metadata: CallMetadata = call_metadata(cluster_secret)

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._rotation.rotated():  # new channels present the new certificate; calls on the old ones finish
            old, self._channels = self._channels, {}
            for stale in old.values():
                task = asyncio.get_running_loop().create_task(stale.close(grace=CONTROLLER_CALL_TIMEOUT_S))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        ch = self._channels.get(address)
        if ch is None:
            ch = aio_channel(address, CHANNEL_OPTIONS, self._tls)
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
        for task in list(self._retiring):
            task.cancel()


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

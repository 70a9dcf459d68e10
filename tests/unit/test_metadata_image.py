from __future__ import annotations

import pytest

from logbroker.cluster.metadata_image import MetadataImage
from logbroker.errors import StaleControllerEpochError
from logbroker.v1 import logbroker_pb2 as pb


def _req(epoch: int, leader: int, leader_epoch: int) -> pb.UpdateMetadataRequest:
    return pb.UpdateMetadataRequest(
        controller_id=1, controller_epoch=epoch,
        brokers=[pb.BrokerInfo(broker_id=1, host="127.0.0.1", port=1)],
        partitions=[pb.PartitionState(topic="t", partition=0, leader=leader, leader_epoch=leader_epoch)],
    )


def test_update_metadata_and_zombie_fence():
    image = MetadataImage()
    image.apply(_req(3, leader=1, leader_epoch=4))
    assert image.partitions["t"][0].leader == 1 and image.broker_address(1) == "127.0.0.1:1"
    with pytest.raises(StaleControllerEpochError):
        image.apply(_req(2, leader=2, leader_epoch=9))
    assert image.partitions["t"][0].leader == 1
    image.apply_partition_states([pb.PartitionState(topic="t", partition=0, leader=2, leader_epoch=3)])
    assert image.partitions["t"][0].leader == 1  # older leader epoch ignored
    image.apply_partition_states([pb.PartitionState(topic="t", partition=0, leader=2, leader_epoch=5)])
    assert image.partitions["t"][0].leader == 2

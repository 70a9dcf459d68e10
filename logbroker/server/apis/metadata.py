"""Metadata: the cluster's brokers and topics as this broker knows them (`TopicCatalog`)."""

from __future__ import annotations

from typing import Protocol

from logbroker.cluster.cluster_view import ClusterView
from logbroker.cluster.metadata import validate_topic_name
from logbroker.errors import BrokerError
from logbroker.server.request_checks import ServingState, check_count, check_ready
from logbroker.server.request_context import RequestContext
from logbroker.v1 import logbroker_pb2 as pb


class TopicCatalog(ClusterView, Protocol):
    """The cluster view, its id, and whether it can be described yet (the broker implements it)."""

    @property
    def cluster_id(self) -> str: ...

    def check_metadata_ready(self) -> None:
        """Raise RequestRejected(UNAVAILABLE) while a cluster member has not heard the metadata yet."""
        ...


class MetadataApis:
    def __init__(self, state: ServingState, catalog: TopicCatalog) -> None:
        self._state = state
        self._catalog = catalog

    async def metadata(self, context: RequestContext, req: pb.MetadataRequest) -> pb.MetadataResponse:
        catalog = self._catalog
        check_ready(self._state)
        catalog.check_metadata_ready()
        check_count(len(req.topics), "topics")
        brokers, controller_id, _ = catalog.cluster_brokers()
        resp = pb.MetadataResponse(cluster_id=catalog.cluster_id, controller_id=controller_id, brokers=brokers)
        for name in list(req.topics) or catalog.topic_names():
            t = resp.topics.add(name=name)
            try:
                validate_topic_name(name)
                states = catalog.topic_partitions(name)
                if states is None:
                    t.error_code = pb.UNKNOWN_TOPIC_OR_PARTITION
                    t.error_message = f"unknown topic {name!r}"
                    continue
                for p, st in sorted(states.items()):
                    t.partitions.add(partition=p, leader=st.leader, leader_epoch=st.leader_epoch,
                                     replicas=st.replicas, isr=st.isr,
                                     error_code=pb.NONE if st.leader >= 0 else pb.LEADER_NOT_AVAILABLE)
            except BrokerError as err:
                t.error_code = err.code
                t.error_message = err.message
        return resp

    async def describe_cluster(self, context: RequestContext,
                               req: pb.DescribeClusterRequest) -> pb.DescribeClusterResponse:
        check_ready(self._state)
        brokers, controller_id, controller_epoch = self._catalog.cluster_brokers()
        return pb.DescribeClusterResponse(cluster_id=self._catalog.cluster_id, controller_id=controller_id,
                                          controller_epoch=controller_epoch, brokers=brokers)

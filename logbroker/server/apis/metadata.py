"""Metadata: the cluster's brokers and topics as this broker knows them (`TopicCatalog`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from logbroker.cluster.cluster_view import ClusterView, partition_parents
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


# may this caller see this topic (Describe)? None: every caller sees every topic
TopicVisibility = Callable[[RequestContext, str], bool]


class MetadataApis:
    def __init__(self, state: ServingState, catalog: TopicCatalog, visible: TopicVisibility | None = None) -> None:
        """`visible` (with an authorizer): a listing of every topic leaves out the ones the caller may
        not describe, and a topic asked for by name is answered TOPIC_AUTHORIZATION_FAILED, with no
        partitions, whether it exists or not."""
        self._state = state
        self._catalog = catalog
        self._visible = visible

    async def metadata(self, context: RequestContext, req: pb.MetadataRequest) -> pb.MetadataResponse:
        catalog = self._catalog
        check_ready(self._state)
        catalog.check_metadata_ready()
        check_count(len(req.topics), "topics")
        brokers, controller_id, _ = catalog.cluster_brokers()
        resp = pb.MetadataResponse(cluster_id=catalog.cluster_id, controller_id=controller_id, brokers=brokers)
        names = list(req.topics) or [n for n in catalog.topic_names()
                                     if self._visible is None or self._visible(context, n)]
        for name in names:
            t = resp.topics.add(name=name)
            if self._visible is not None and req.topics and not self._visible(context, name):
                t.error_code = pb.TOPIC_AUTHORIZATION_FAILED
                t.error_message = "not authorized to describe this topic"
                continue
            try:
                validate_topic_name(name)
                states = catalog.topic_partitions(name)
                if states is None:
                    t.error_code = pb.UNKNOWN_TOPIC_OR_PARTITION
                    t.error_message = f"unknown topic {name!r}"
                    continue
                for p, st in sorted(states.items()):
                    pm = t.partitions.add(partition=p, leader=st.leader, leader_epoch=st.leader_epoch,
                                          replicas=st.replicas, isr=st.isr,
                                          error_code=pb.NONE if st.leader >= 0 else pb.LEADER_NOT_AVAILABLE)
                    for parent, offset in sorted(partition_parents(catalog, name, p).items()):
                        pm.parents.add(partition=parent, split_offset=offset)
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

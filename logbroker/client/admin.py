"""The admin client: topics (create, delete, list, describe, add partitions), consumer groups and
share groups (queues: settings, describe, purge, redrive of dead letters).

Topic requests go to the controller when the metadata names one, else to any known broker. Only a
call that never reached a broker (gRPC UNAVAILABLE) is retried on the next broker: creating a topic
is not idempotent, so a timed-out CreateTopics is reported, not repeated.

Group requests go to the group's coordinator (logbroker/client/coordinator.py), except ListGroups,
which each broker answers for the groups it coordinates: the admin asks every live broker and merges.
Lag and offset resets read log end offsets (high watermarks) with ListOffsets at partition leaders.
Offsets are reset only while the group has no members, committing as a non-member (member id "").
Share-group calls go to the share group's coordinator too (ListShareGroups to every broker).

Every call feeds its broker's circuit (client/circuit.py, shared through the metadata cache): a
retriable failure counts against it, any answer (a final refusal too) closes it. A broker whose
circuit is open gets nothing during its cool-down: topic requests pass it over for the next broker
(an overloaded one, which did nothing, too), ListGroups reports it as not answering, ListOffsets
counts its partitions as failed (retried after a refresh), and coordinator calls wait for its probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from logbroker.client.call_errors import rpc_error, rpc_error_text
from logbroker.client.circuit import Circuits
from logbroker.client.coordinator import CoordinatorClient
from logbroker.client.hot_partitions import HotPartition
from logbroker.client.hot_partitions import from_response as hot_rows
from logbroker.client.hot_partitions import merge as merge_hot
from logbroker.client.metadata_cache import MetadataCache, metadata_for
from logbroker.client.queue.queue_consumer import share_settings
from logbroker.client.queue.redrive import redrive
from logbroker.client.sasl import SaslConfig
from logbroker.errors import (
    BrokerError,
    BrokerOverloadedError,
    BrokerUnavailableError,
    GroupIdNotFoundError,
    LeaderNotAvailableError,
    LogbrokerError,
    NonEmptyGroupError,
    UnknownTopicOrPartitionError,
    error_for,
)
from logbroker.group.lag import partition_lag
from logbroker.security.acl import AclBinding
from logbroker.security.scram import DEFAULT_ITERATIONS, Mechanism, make_credential
from logbroker.tls import TlsConfig
from logbroker.v1 import logbroker_pb2 as pb

T = TypeVar("T")
TopicPartition = tuple[str, int]
log = logging.getLogger(__name__)

EARLIEST = -2
LATEST = -1
RESET_MODES = ("earliest", "latest", "offset", "shift", "datetime")


@dataclass(frozen=True)
class PartitionInfo:
    partition: int
    leader: int
    replicas: list[int]
    isr: list[int]
    leader_epoch: int
    log_start_offset: int
    log_end_offset: int
    high_watermark: int
    size_bytes: int
    offline_replicas: list[int] = field(default_factory=list)  # replicas whose log is offline
    # lineage (cluster/lineage.py): parent partition -> split offset, for a partition added by growth
    parents: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicDescription:
    name: str
    config: dict[str, str]
    partitions: list[PartitionInfo] = field(default_factory=list)
    topic_id: str = ""  # unique per incarnation of the topic name


@dataclass(frozen=True)
class GroupListing:
    group: str
    state: str  # empty | reconciling | stable
    members: int
    coordinator_id: int  # the broker that coordinates it


@dataclass(frozen=True)
class GroupMemberInfo:
    member_id: str
    member_epoch: int
    state: str  # stable | unrevoked_partitions | unreleased_partitions
    subscribed_topics: list[str]
    subscribed_regex: str
    assigned: list[TopicPartition]  # may own now
    revoking: list[TopicPartition]  # told to give up, not yet confirmed (still its own)
    target: list[TopicPartition]
    client_host: str


@dataclass(frozen=True)
class GroupDescription:
    group: str
    state: str
    group_epoch: int
    assignor: str
    coordinator_id: int
    members: list[GroupMemberInfo]
    offsets: dict[TopicPartition, int]  # committed: the next offset to read


@dataclass(frozen=True)
class PartitionLag:
    """One row of `logbroker groups describe` (Kafka's columns)."""

    topic: str
    partition: int
    current_offset: int | None  # committed; None: nothing committed
    log_end_offset: int | None  # the high watermark; None: unknown (no leader)
    lag: int | None
    member_id: str  # "" when no member owns it


def _entry_dict(e: pb.AclEntry) -> dict[str, object]:
    return {f: getattr(e, f) for f in ("principal", "host", "operation", "permission", "resource_type", "name",
                                       "pattern_type")}


class Admin:
    """Topic and consumer-group administration over the `logbroker.v1.Admin` service."""

    def __init__(
        self,
        bootstrap: str | Sequence[str] | MetadataCache,
        *,
        request_timeout_ms: int = 30_000,
        retry_backoff_ms: int = 100,
        tls: TlsConfig | bool | None = None,
        sasl: SaslConfig | None = None,
        client_id: str | None = None,
    ) -> None:
        """`tls`: a TlsConfig (CA, client certificate; logbroker/tls.py), or True for TLS with the
        system's CAs. `sasl`: log in with SCRAM (client/sasl.py; needs `tls`). `client_id`: the
        name brokers log for this client (logbroker/client_id.py; None: "logbroker-python")."""
        self._timeout_s = request_timeout_ms / 1000
        self._retry_backoff_s = retry_backoff_ms / 1000
        self._metadata, self._owns_metadata = metadata_for(bootstrap, request_timeout_ms, retry_backoff_ms,
                                                                tls=tls, sasl=sasl, client_id=client_id)

    def _call(self, fn: Callable[[Any], T]) -> T:
        """fn(AdminStub) on the controller, then on other brokers while they are unreachable; a
        broker whose circuit is open (client/circuit.py) is passed over, and each call feeds it."""
        first = self._metadata.controller_address() or self._metadata.any_address()
        addresses = [first] + [a for a in self._metadata.candidate_addresses() if a != first]
        circuits = self._metadata.circuits
        last: grpc.RpcError | None = None
        skipped: list[str] = []
        for address in addresses:
            if not circuits.allow(address):
                skipped.append(address)
                continue
            try:
                out = fn(self._metadata.admin_stub(address))
            except grpc.RpcError as e:
                err = rpc_error(e)
                _feed_circuit(circuits, address, err)
                if e.code() != grpc.StatusCode.UNAVAILABLE and not isinstance(err, BrokerOverloadedError):
                    raise err from None  # (overloaded: refused, nothing done; unreachable: never reached)
                self._metadata.check_tls_refusal(address, e)
                last = e
                continue
            circuits.succeeded(address)
            return out
        why = rpc_error_text(last) if last is not None else "no broker"
        if skipped:
            why += f"; circuit open (no requests for a cool-down) to {', '.join(skipped)}"
        raise BrokerUnavailableError(f"no broker answered (tried {', '.join(addresses)}): {why}")

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        replication_factor: int = 1,
        config: Mapping[str, object] | None = None,
    ) -> None:
        """Create a topic; raises TopicAlreadyExistsError, InvalidTopicError, InvalidConfigError, ..."""
        topic = pb.NewTopic(
            name=name,
            partitions=partitions,
            replication_factor=replication_factor,
            config={str(k): _config_value(v) for k, v in (config or {}).items()},
        )
        request = pb.CreateTopicsRequest(topics=[topic])
        resp = self._call(lambda stub: stub.CreateTopics(request, timeout=self._timeout_s))
        _raise_for(resp.results, name)

    def delete_topic(self, name: str) -> None:
        request = pb.DeleteTopicsRequest(names=[name])
        resp = self._call(lambda stub: stub.DeleteTopics(request, timeout=self._timeout_s))
        _raise_for(resp.results, name)

    def create_partitions(self, name: str, total: int) -> None:
        """Grow the topic to `total` partitions (raises InvalidPartitionsError if that is not more)."""
        request = pb.CreatePartitionsRequest(name=name, total=total)
        resp = self._call(lambda stub: stub.CreatePartitions(request, timeout=self._timeout_s))
        _raise_for([resp.result], name)

    def list_topics(self, include_internal: bool = False) -> list[str]:
        """Names of every topic, sorted; internal ones ("__" prefix) only if asked."""
        resp = self._metadata.refresh(None)
        names = [t.name for t in resp.topics if t.error_code == pb.NONE or t.partitions]
        return sorted(n for n in names if include_internal or not n.startswith("__"))

    def describe_topic(self, name: str) -> TopicDescription:
        request = pb.DescribeTopicsRequest(names=[name])
        resp = self._call(lambda stub: stub.DescribeTopics(request, timeout=self._timeout_s))
        for t in resp.topics:
            if t.name != name:
                continue
            if t.error_code != pb.NONE:
                raise error_for(t.error_code, t.error_message or name)
            return _description(t)
        raise error_for(pb.UNKNOWN_TOPIC_OR_PARTITION, f"topic {name!r} does not exist")

    def describe_topics(self, names: Sequence[str] | None = None) -> list[TopicDescription]:
        """Descriptions of `names` (None: every topic); raises on the first topic with an error."""
        request = pb.DescribeTopicsRequest(names=list(names or ()))
        resp = self._call(lambda stub: stub.DescribeTopics(request, timeout=self._timeout_s))
        out = []
        for t in resp.topics:
            if t.error_code != pb.NONE:
                raise error_for(t.error_code, t.error_message or t.name)
            out.append(_description(t))
        return out

    def describe_cluster(self) -> dict[str, Any]:
        """{"cluster_id", "controller_id", "controller_epoch", "brokers": [{broker_id, host, port, rack}]}."""
        resp = self._call(lambda stub: stub.DescribeCluster(pb.DescribeClusterRequest(), timeout=self._timeout_s))
        return {
            "cluster_id": resp.cluster_id,
            "controller_id": resp.controller_id,
            "controller_epoch": resp.controller_epoch,
            "brokers": [
                {"broker_id": b.broker_id, "host": b.host, "port": b.port, "rack": b.rack}
                for b in sorted(resp.brokers, key=lambda b: b.broker_id)
            ],
        }

    def reassign_partition(self, name: str, partition: int, replicas: Sequence[int],
                           throttle_bytes_per_sec: int = 0) -> None:
        """Start moving a partition to `replicas` (first = preferred leader); data is copied first, by
        each replica added at most `throttle_bytes_per_sec` (0: unthrottled) until it has caught up."""
        request = pb.ReassignPartitionRequest(topic=name, partition=partition, replicas=list(replicas),
                                              replication_throttle_bytes_per_sec=throttle_bytes_per_sec)
        resp = self._call(lambda stub: stub.ReassignPartition(request, timeout=self._timeout_s))
        if resp.error_code != pb.NONE:
            raise error_for(resp.error_code, resp.error_message)

    def recover_empty_partition(self, name: str, partition: int) -> None:
        """Accept the loss of an offline partition (its log directory vanished): the broker
        recreates it empty and serves it again. InvalidRequestError if it is not offline."""
        request = pb.RecoverEmptyPartitionRequest(topic=name, partition=partition)
        resp = self._call(lambda stub: stub.RecoverEmptyPartition(request, timeout=self._timeout_s))
        if resp.error_code != pb.NONE:
            raise error_for(resp.error_code, resp.error_message)

    # -- consumer groups -------------------------------------------------------------------------

    def _coordinator(self, group: str) -> CoordinatorClient:
        if not group:
            raise ValueError("group must be a non-empty string")
        return CoordinatorClient(self._metadata, group, self._timeout_s, self._retry_backoff_s)

    def list_groups(self) -> list[GroupListing]:
        """Every group some broker coordinates (each broker answers for its own), sorted by name.

        Raises BrokerUnavailableError when no broker answers; brokers that do not are logged.
        """
        return self._list_everywhere("ListGroups", pb.ListGroupsRequest())

    def _list_everywhere(self, method: str, request: Any) -> list[GroupListing]:
        """`method` (ListGroups / ListShareGroups) at every live broker, merged by group name."""
        self._metadata.refresh(None)
        brokers = self._metadata.brokers() or {-1: self._metadata.any_address()}
        found: dict[str, GroupListing] = {}
        answered = 0
        failed: list[str] = []
        circuits = self._metadata.circuits
        for broker_id, address in sorted(brokers.items()):
            if not circuits.allow(address):  # (client/circuit.py)
                failed.append(f"{broker_id} at {address}: circuit open (no requests for a cool-down)")
                continue
            try:
                resp = getattr(self._metadata.admin_stub(address), method)(request, timeout=self._timeout_s)
            except grpc.RpcError as e:
                _feed_circuit(circuits, address, rpc_error(e))
                failed.append(f"{broker_id} at {address}: {rpc_error(e)}")
                continue
            circuits.succeeded(address)
            answered += 1
            for g in resp.groups:
                seen = found.get(g.group)
                if seen is None or g.members > seen.members:  # mid-failover two may answer: the live one
                    found[g.group] = GroupListing(g.group, g.state, g.members, broker_id)
        if not answered:
            raise BrokerUnavailableError(f"no broker answered {method}: {'; '.join(failed)}")
        if failed:
            log.warning("%s: some brokers did not answer (their groups are missing): %s", method, "; ".join(failed))
        return [found[name] for name in sorted(found)]

    def describe_group(self, group: str) -> GroupDescription:
        """Members, their assignments and the committed offsets; raises GroupIdNotFoundError."""
        resp = self._coordinator(group).call(
            "admin", "DescribeGroup", pb.DescribeGroupRequest(group=group), time.monotonic() + self._timeout_s)
        if resp.error_code != pb.NONE:
            raise error_for(resp.error_code, resp.error_message or f"group {group}")
        members = [
            GroupMemberInfo(
                member_id=m.member_id, member_epoch=m.member_epoch, state=m.state,
                subscribed_topics=list(m.subscribed_topics), subscribed_regex=m.subscribed_regex,
                assigned=_partitions(m.assigned), revoking=_partitions(m.revoking), target=_partitions(m.target),
                client_host=m.client_host,
            )
            for m in sorted(resp.members, key=lambda m: m.member_id)
        ]
        offsets = {(o.topic, o.partition): o.offset for o in sorted(resp.offsets, key=lambda o: (o.topic, o.partition))}
        return GroupDescription(resp.group or group, resp.state, resp.group_epoch, resp.assignor, resp.coordinator_id,
                                members, offsets)

    def group_lag(self, group: str, description: GroupDescription | None = None) -> list[PartitionLag]:
        """Per partition the group owns or has committed: committed offset, log end, lag, owner."""
        d = description or self.describe_group(group)
        owner: dict[TopicPartition, str] = {}
        for m in d.members:
            for tp in m.assigned + m.revoking:
                owner[tp] = m.member_id
        tps = sorted(set(d.offsets) | set(owner))
        ends, _ = self._list_offsets(tps, LATEST)
        rows = []
        for tp in tps:
            current = d.offsets.get(tp)
            end = ends.get(tp)
            lag = partition_lag(current, end)
            rows.append(PartitionLag(tp[0], tp[1], current, end, lag, owner.get(tp, "")))
        return rows

    def delete_group(self, group: str) -> None:
        """Delete a group's committed offsets; raises NonEmptyGroupError while it has members."""
        resp = self._coordinator(group).call(
            "admin", "DeleteGroup", pb.DeleteGroupRequest(group=group), time.monotonic() + self._timeout_s)
        if resp.error_code != pb.NONE:
            raise error_for(resp.error_code, resp.error_message or f"group {group}")

    def reset_offsets(
        self,
        group: str,
        topic: str,
        to: str,
        value: int | None = None,
        partitions: Iterable[int] | None = None,
        dry_run: bool = False,
        allow_new_group: bool = True,
    ) -> dict[TopicPartition, int]:
        """Set the group's committed offsets of `topic` (all or some partitions); returns them.

        `to`: "earliest", "latest", "offset" (`value`), "shift" (committed + `value`, from the log start
        when nothing is committed) or "datetime" (`value` in ms since the epoch: the first record at or
        after it, else the log end). Results are clamped to [log start, log end]. Only while the group
        has no members (NonEmptyGroupError); `dry_run` computes without committing. A group that does
        not exist is created by the commit, unless `allow_new_group=False` (GroupIdNotFoundError).
        """
        if to not in RESET_MODES:
            raise ValueError(f"reset to must be one of {', '.join(RESET_MODES)}, not {to!r}")
        if to in ("offset", "shift", "datetime") and value is None:
            raise ValueError(f"reset to {to} needs a value")
        if to == "offset" and value is not None and value < 0:
            raise ValueError(f"offset must be >= 0, got {value}")
        coordinator = self._coordinator(group)
        count = self._metadata.partitions_for(topic)
        wanted = sorted(set(partitions)) if partitions is not None else list(range(count))
        bad = [p for p in wanted if not 0 <= p < count]
        if bad:
            raise UnknownTopicOrPartitionError(f"{topic} has {count} partitions, not {bad}")
        tps = [(topic, p) for p in wanted]
        try:
            current = self.describe_group(group)
        except GroupIdNotFoundError:
            if not allow_new_group:
                raise GroupIdNotFoundError(f"group {group} does not exist") from None
            committed: dict[TopicPartition, int] = {}
        else:
            if current.members:
                raise NonEmptyGroupError(
                    f"group {group} has {len(current.members)} active member(s): stop them before resetting offsets")
            committed = current.offsets
        starts = self._require_offsets(tps, EARLIEST)
        ends = self._require_offsets(tps, LATEST)
        if to == "earliest":
            target = dict(starts)
        elif to == "latest":
            target = dict(ends)
        elif to == "offset":
            target = {tp: int(value or 0) for tp in tps}
        elif to == "shift":
            target = {tp: committed.get(tp, starts[tp]) + int(value or 0) for tp in tps}
        else:
            found = self._require_offsets(tps, int(value or 0))
            target = {tp: found[tp] if found[tp] >= 0 else ends[tp] for tp in tps}
        target = {tp: min(max(off, starts[tp]), ends[tp]) for tp, off in target.items()}
        if dry_run:
            return target
        request = pb.OffsetCommitRequest(group=group, member_id="", member_epoch=-1, partitions=[
            pb.OffsetCommitPartition(topic=t, partition=p, offset=off) for (t, p), off in sorted(target.items())
        ])
        resp = coordinator.call("broker", "OffsetCommit", request, time.monotonic() + self._timeout_s)
        if resp.error_code != pb.NONE:
            err = error_for(resp.error_code, resp.error_message or f"group {group}")
            if resp.error_code == pb.UNKNOWN_MEMBER_ID:
                raise NonEmptyGroupError(f"group {group} has active members: stop them before resetting offsets "
                                         f"({err.message})")
            raise err
        for r in resp.results:
            if r.error_code != pb.NONE:
                raise error_for(r.error_code, f"{r.topic}-{r.partition}: {r.error_message}")
        return target

    def _require_offsets(self, tps: list[TopicPartition], timestamp: int) -> dict[TopicPartition, int]:
        found, errors = self._list_offsets(tps, timestamp)
        for tp in tps:
            if tp not in found:
                raise errors.get(tp) or LeaderNotAvailableError(f"{tp[0]}-{tp[1]}: no offset found")
        return found

    def _list_offsets(
        self, tps: Sequence[TopicPartition], timestamp: int
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, LogbrokerError]]:
        """ListOffsets at each partition's leader (-1: high watermark, -2: log start, else a time in ms;
        -1 comes back for a time after the last record). Retriable failures get a second round after
        a metadata refresh; what still fails is returned as errors."""
        found: dict[TopicPartition, int] = {}
        errors: dict[TopicPartition, LogbrokerError] = {}
        todo = list(dict.fromkeys(tps))
        if todo:
            self._metadata.refresh(sorted({t for t, _ in todo}))
        for attempt in range(2):
            if not todo:
                break
            if attempt:
                time.sleep(self._retry_backoff_s)
                self._metadata.refresh(sorted({t for t, _ in todo}))
            by_leader: dict[str, list[TopicPartition]] = {}
            retry: list[TopicPartition] = []
            for tp in todo:
                try:
                    leader = self._metadata.leader(*tp)
                except UnknownTopicOrPartitionError as e:
                    errors[tp] = e
                    continue
                if leader is None:
                    errors[tp] = LeaderNotAvailableError(f"{tp[0]}-{tp[1]} has no leader")
                    retry.append(tp)
                    continue
                by_leader.setdefault(leader, []).append(tp)
            for address, group in by_leader.items():
                request = pb.ListOffsetsRequest(partitions=[
                    pb.ListOffsetsPartition(topic=t, partition=p, timestamp=timestamp) for t, p in group
                ])
                resp = self._list_offsets_at(address, request)
                if isinstance(resp, LogbrokerError):
                    for tp in group:
                        errors[tp] = resp
                    retry.extend(group)
                    continue
                results = {(r.topic, r.partition): r for r in resp.results}
                for tp in group:
                    r = results.get(tp)
                    if r is None:
                        retry.append(tp)
                    elif r.error_code != pb.NONE:
                        berr: BrokerError = error_for(r.error_code, r.error_message)
                        errors[tp] = berr
                        if berr.retriable:
                            retry.append(tp)
                    else:
                        found[tp] = r.offset
                        errors.pop(tp, None)
            todo = retry
        return found, errors

    def _list_offsets_at(self, leader: str, request: pb.ListOffsetsRequest) -> Any:
        """The leader's ListOffsetsResponse, or the whole call's error; nothing is sent to a leader
        whose circuit is open (client/circuit.py), and the call feeds it."""
        circuits = self._metadata.circuits
        if not circuits.allow(leader):
            return BrokerUnavailableError(f"circuit to {leader} open (no requests to it for a cool-down)")
        try:
            resp = self._metadata.broker_stub(leader).ListOffsets(request, timeout=self._timeout_s)
        except grpc.RpcError as e:
            err = rpc_error(e)
            _feed_circuit(circuits, leader, err)
            return err
        circuits.succeeded(leader)
        return resp

    # -- share groups (queues) -------------------------------------------------------------------

    def _share_call(self, group: str, method: str, request: Any) -> Any:
        """`method` of the Admin service at the share group's coordinator; raises its error code."""
        resp = self._coordinator(group).call("admin", method, request, time.monotonic() + self._timeout_s)
        if resp.error_code != pb.NONE:
            raise error_for(resp.error_code, resp.error_message or f"share group {group}")
        return resp

    def alter_share_group(self, group: str, **settings: Any) -> None:
        """Change a share group's settings (lock_ms, max_delivery_attempts, retry_backoff_ms,
        retry_backoff_max_ms, dead_letter_topic, dead_letter_expired, max_in_flight_records,
        auto_offset_reset, ordering, filter); the ones not given keep their value (filter="" removes the
        group's filter). TypeError for an unknown name."""
        request = pb.AlterShareGroupRequest(group=group, settings=share_settings(**settings))
        self._share_call(group, "AlterShareGroup", request)

    def describe_share_group(self, group: str) -> dict[str, Any]:
        """{"group", "coordinator_id", "settings": {name: value}, "members": [{member_id, member_epoch,
        topics, acquired}], "partitions": [{topic, partition, start_offset, end_offset, in_flight,
        acquired, available, delayed, dead_lettered, expired, oldest_unsettled_age_ms, acknowledged,
        log_end_offset}]}, as DescribeShareGroupResponse; raises GroupIdNotFoundError."""
        resp = self._share_call(group, "DescribeShareGroup", pb.DescribeShareGroupRequest(group=group))
        settings = {f.name: getattr(resp.settings, f.name) for f in resp.settings.DESCRIPTOR.fields
                    if resp.settings.HasField(f.name)}
        members = [{f.name: _plain(getattr(m, f.name)) for f in m.DESCRIPTOR.fields}
                   for m in sorted(resp.members, key=lambda m: m.member_id)]
        partitions = [{f.name: getattr(p, f.name) for f in p.DESCRIPTOR.fields}
                      for p in sorted(resp.partitions, key=lambda p: (p.topic, p.partition))]
        return {"group": resp.group or group, "coordinator_id": resp.coordinator_id, "settings": settings,
                "members": members, "partitions": partitions}

    def list_share_groups(self) -> list[GroupListing]:
        """Every share group some broker coordinates, sorted by name (as list_groups)."""
        return self._list_everywhere("ListShareGroups", pb.ListShareGroupsRequest())

    def purge_share_group(self, group: str, topics: Sequence[str] | None = None) -> int:
        """Settle everything the group has not settled in `topics` (None: all its topics), as SQS's
        PurgeQueue (nothing is dead-lettered); returns how many records the purge settled."""
        request = pb.PurgeShareGroupRequest(group=group, topics=list(topics or ()))
        return int(self._share_call(group, "PurgeShareGroup", request).purged)

    def redrive(self, dlq_topic: str, group: str = "redrive", max_messages: int | None = None,
                timeout_s: float = 30.0) -> int:
        """Move the dead letters of `dlq_topic` back to their source topics, at least once (see
        logbroker/client/queue/redrive.py); returns how many were moved."""
        return redrive(self._metadata, dlq_topic, group, max_messages, timeout_s, round(self._timeout_s * 1000))

    # -- ACLs and SCRAM users (logbroker acls, logbroker users; logbroker/security/) ---------------

    def _security_call(self, method: str, request: Any) -> Any:
        resp = self._call(lambda stub: getattr(stub, method)(request, timeout=self._timeout_s))
        if resp.error_code != pb.NONE:
            raise error_for(resp.error_code, resp.error_message)
        return resp

    def create_acls(self, bindings: Sequence[AclBinding]) -> int:
        """Store the bindings (checked first: malformed ones raise AclError here, and
        SecurityConfigInvalidError from the broker); returns how many were new."""
        request = pb.CreateAclsRequest(acls=[pb.AclEntry(**b.to_json()) for b in bindings])
        return int(self._security_call("CreateAcls", request).created)

    def delete_acls(self, **match: str) -> list[AclBinding]:
        """Remove every binding whose fields equal `match` (principal=, host=, operation=,
        permission=, resource_type=, name=, pattern_type=; none given: all); returns them."""
        resp = self._security_call("DeleteAcls", pb.DeleteAclsRequest(filter=pb.AclEntry(**match)))
        return [AclBinding.from_json(_entry_dict(e)) for e in resp.deleted]

    def describe_acls(self, **match: str) -> list[AclBinding]:
        resp = self._security_call("DescribeAcls", pb.DescribeAclsRequest(filter=pb.AclEntry(**match)))
        return [AclBinding.from_json(_entry_dict(e)) for e in resp.acls]

    def upsert_user(self, user: str, password: str, mechanism: str = "SCRAM-SHA-256",
                    iterations: int = DEFAULT_ITERATIONS) -> None:
        """Set `user`'s SCRAM credential for `mechanism`. The salted, hashed credential is computed
        here: the password never leaves this process."""
        cred = make_credential(Mechanism.parse(mechanism), password, iterations)
        entry = pb.ScramCredentialEntry(user=user, mechanism=cred.mechanism.value, salt=cred.salt,
                                        iterations=cred.iterations, stored_key=cred.stored_key,
                                        server_key=cred.server_key)
        self._security_call("AlterUserScramCredentials", pb.AlterUserScramCredentialsRequest(upserts=[entry]))

    def delete_user(self, user: str) -> bool:
        request = pb.AlterUserScramCredentialsRequest(deletions=[user])
        return bool(self._security_call("AlterUserScramCredentials", request).deleted)

    def list_users(self) -> dict[str, list[str]]:
        resp = self._security_call("DescribeUserScramCredentials", pb.DescribeUserScramCredentialsRequest())
        return {u.user: list(u.mechanisms) for u in resp.users}

    # -- client quotas (logbroker quotas; logbroker/security/quotas.py) ------------------------------

    def set_quota(self, user: str | None = None, client_id: str | None = None, **rates: float) -> None:
        """Set `rates` (producer_byte_rate=, consumer_byte_rate=, request_percentage=) of the entity
        (`user` and/or `client_id`, each a name or "<default>"); its other rates are kept. Bad input
        raises InvalidConfigError and stores nothing."""
        entry = pb.QuotaEntry(user=user, client_id=client_id, **rates)
        self._security_call("AlterClientQuotas", pb.AlterClientQuotasRequest(set=[entry]))

    def delete_quota(self, user: str | None = None, client_id: str | None = None) -> bool:
        """Remove every quota of the entity; False when it had none."""
        entry = pb.QuotaEntry(user=user, client_id=client_id)
        return bool(self._security_call("AlterClientQuotas", pb.AlterClientQuotasRequest(deletions=[entry])).deleted)

    def describe_quotas(self) -> list[dict[str, Any]]:
        """Every stored quota as {"user"?, "client_id"?, rate name: value...}."""
        resp = self._security_call("DescribeClientQuotas", pb.DescribeClientQuotasRequest())
        return [{f.name: v for f, v in e.ListFields()} for e in resp.quotas]

    # -- hot partitions (logbroker topics hot; server/apis/heat.py) ----------------------------------

    def describe_hot_partitions(self, topics: Sequence[str] = (), top: int = 10, keys: int = 5) -> list[HotPartition]:
        """The `top` hottest partitions of `topics` (empty: every topic) across the cluster, by bytes
        in per second, each with its `keys` heaviest keys: every live broker answers for the
        partitions it leads (client/hot_partitions.py merges). A broker that does not answer is
        logged (its partitions are missing); raises BrokerUnavailableError when none answers, and a
        refusal (PERMISSION_DENIED, INVALID_ARGUMENT) as its error."""
        self._metadata.refresh(None)
        brokers = self._metadata.brokers() or {-1: self._metadata.any_address()}
        request = pb.DescribeHotPartitionsRequest(topics=list(topics), top=top, keys=keys)
        rows: list[HotPartition] = []
        answered = 0
        failed: list[str] = []
        circuits = self._metadata.circuits
        for broker_id, address in sorted(brokers.items()):
            if not circuits.allow(address):
                failed.append(f"{broker_id} at {address}: circuit open (no requests for a cool-down)")
                continue
            try:
                resp = self._metadata.admin_stub(address).DescribeHotPartitions(request, timeout=self._timeout_s)
            except grpc.RpcError as e:
                err = rpc_error(e)
                _feed_circuit(circuits, address, err)
                if not getattr(err, "retriable", False):  # unreachable, overloaded, timed out: next broker
                    raise err from None
                failed.append(f"{broker_id} at {address}: {err}")
                continue
            circuits.succeeded(address)
            if resp.error_code:
                raise error_for(resp.error_code, resp.error_message)
            answered += 1
            rows.extend(hot_rows(resp.broker_id if broker_id < 0 else broker_id, resp))
        if not answered:
            raise BrokerUnavailableError(f"no broker answered DescribeHotPartitions: {'; '.join(failed)}")
        if failed:
            log.warning("DescribeHotPartitions: some brokers did not answer (their partitions are missing): %s",
                        "; ".join(failed))
        return merge_hot(rows, top)

    def close(self) -> None:
        if self._owns_metadata:
            self._metadata.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _feed_circuit(circuits: Circuits, address: str, err: LogbrokerError) -> None:
    """A failed call's news for the broker's circuit: a retriable failure counts against it, a
    final refusal is an answer (the broker is up)."""
    if getattr(err, "retriable", False):
        circuits.failed(address, err)
    else:
        circuits.succeeded(address)


def _partitions(a: pb.Assignment) -> list[TopicPartition]:
    return sorted((t.topic, p) for t in a.topics for p in t.partitions)


def _plain(v: Any) -> Any:
    """A repeated protobuf field as a list; scalars as they are."""
    return v if isinstance(v, (str, bytes, int, float, bool)) else list(v)


def _config_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _raise_for(results: Sequence[pb.TopicResult], name: str) -> None:
    for r in results:
        if r.error_code != pb.NONE:
            raise error_for(r.error_code, r.error_message or r.name or name)


def _description(t: pb.TopicDescription) -> TopicDescription:
    parts = [
        PartitionInfo(
            partition=p.partition,
            leader=p.leader,
            replicas=list(p.replicas),
            isr=list(p.isr),
            leader_epoch=p.leader_epoch,
            log_start_offset=p.log_start_offset,
            log_end_offset=p.log_end_offset,
            high_watermark=p.high_watermark,
            size_bytes=p.size_bytes,
            offline_replicas=list(p.offline_replicas),
            parents={pp.partition: pp.split_offset for pp in p.parents},
        )
        for p in sorted(t.partitions, key=lambda p: p.partition)
    ]
    return TopicDescription(name=t.name, config=dict(t.config), partitions=parts, topic_id=t.topic_id)

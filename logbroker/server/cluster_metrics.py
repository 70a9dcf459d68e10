"""Cluster, consumer and business figures for `/metrics` (registered by server/metrics.py).

Read at scrape time on the broker's event loop, as server/metrics.py's `BrokerCollector` does,
within SCRAPE_TIMEOUT_S; the consumer lag may ask other brokers for high watermarks
(LAG_LOOKUP_TIMEOUT_S, below the scrape bound). A loop that does not answer in time shows as
`logbroker_cluster_metrics_up 0` and nothing else from this collector.

| metric | type | meaning |
|---|---|---|
| `logbroker_cluster_metrics_up` | gauge | 1 if the loop answered this collector's scrape |
| `logbroker_isr_shrinks_total` | counter | ISR changes committed by this broker as leader that removed a replica |
| `logbroker_isr_expands_total` | counter | ISR changes committed by this broker as leader that added a replica |
| `logbroker_leader_partitions` | gauge | hosted partitions this broker leads |
| `logbroker_replica_partitions` | gauge | hosted partition replicas, any role (leaders included: Kafka's PartitionCount) |
| `logbroker_replication_throttled_partitions` | gauge | partitions this broker, as a follower being added by a reassignment, fetches under a replication throttle now |
| `logbroker_replication_throttled_bytes_total` | counter | bytes this broker fetched as such a follower while behind the leader (paid to the throttle) |
| `logbroker_active_controller` | gauge | 1 on the broker that is the controller now, else 0; a standalone broker: 1 |
| `logbroker_zookeeper_session_state{state}` | gauge | 1 for the session's state (`connected`, `suspended`, `lost`, `none` before the first connection), 0 for the others; a standalone broker (no ZooKeeper) shows one series, `state="standalone"` 1 |
| `logbroker_consumer_group_members{group}` | gauge | members of each consumer group this broker coordinates |
| `logbroker_consumer_group_lag{group,topic,partition}` | gauge | records between the group's committed offset and the partition's high watermark (group/lag.py: the lag `groups describe` shows); committed partitions whose high watermark is unknown (no leader, no answer in time) are left out |
| `logbroker_share_group_in_flight{group,topic,partition}` | gauge | records of the share group's window not settled yet (acquired, available, delayed: `queues describe`'s in_flight) |
| `logbroker_share_group_acknowledged_total{group}` | counter | records acknowledged (accept) since this coordinator loaded the group |
| `logbroker_share_group_redeliveries_total{group}` | counter | records handed out again (released, lock expired) since the load |
| `logbroker_share_group_dead_letters_total{group}` | counter | records archived as dead letters (rejected, delivery limit, TTL) since the load |
| `logbroker_share_group_oldest_unsettled_age_seconds{group}` | gauge | age of the oldest unsettled record of the group's partitions (0: none) |
| `logbroker_topic_active_producers{topic}` | gauge | distinct clients (client id, else principal) that produced to the topic on this broker in the last minute (server/active_clients.py) |
| `logbroker_topic_active_consumers{topic}` | gauge | distinct clients that fetched or share-fetched from the topic on this broker in the last minute |
| `logbroker_metrics_series_dropped{metric}` | gauge | series left out of this scrape by the bounds below |

Only the broker that coordinates a group (leads its `__consumer_offsets` partition) reports it, so
a group never appears twice across brokers. The share groups' counters start over when a group's
coordinator moves (they are not persisted; group/share_partition.py `Counters`): Prometheus' rate()
treats that as a counter reset. Active clients are counted per broker: sum over brokers counts a
client that talks to several leaders more than once; take max() for a lower bound.

Cardinality bounds: `group` labels at most MAX_GROUPS per metric (consumer and share groups each);
`{group,topic,partition}` series at most MAX_PARTITION_SERIES per metric; `topic` labels of active
clients at most server/active_clients.py's MAX_TOPICS. What a bound leaves out is counted in
`logbroker_metrics_series_dropped`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from logbroker.group.lag import group_lags, wanted_partitions
from logbroker.replication.partition import Role
from logbroker.server.active_clients import CONSUMERS, PRODUCERS
from logbroker.server.scrape import read_on_loop

if TYPE_CHECKING:
    from logbroker.group.coordinator import GroupCoordinator
    from logbroker.group.share_group import ShareGroup
    from logbroker.server.broker import Broker


SCRAPE_TIMEOUT_S = 2.5
LAG_LOOKUP_TIMEOUT_S = 1.5  # asking other leaders for high watermarks, within the scrape bound
MAX_GROUPS = 10_000
MAX_PARTITION_SERIES = 10_000
ZK_STATES = ("connected", "suspended", "lost", "none")
STANDALONE = "standalone"

LagRow = tuple[str, str, int, int]  # group, topic, partition, lag


@dataclass(frozen=True)
class ShareGroupFigures:
    group: str
    acknowledged: int
    redelivered: int
    dead_lettered: int
    oldest_unsettled_age_ms: int
    in_flight: tuple[tuple[str, int, int], ...]  # (topic, partition, records)


@dataclass
class ClusterSnapshot:
    isr_shrinks: int = 0
    isr_expands: int = 0
    leader_partitions: int = 0
    replica_partitions: int = 0
    throttled_partitions: int = 0
    throttled_bytes: int = 0
    active_controller: int = 0
    zk_state: str = STANDALONE
    group_members: list[tuple[str, int]] = field(default_factory=list)
    group_lag: list[LagRow] = field(default_factory=list)
    share_groups: list[ShareGroupFigures] = field(default_factory=list)
    active: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> topic -> clients
    dropped: dict[str, int] = field(default_factory=dict)  # metric -> series left out


def lag_rows(groups: Iterable[tuple[str, int, Mapping[tuple[str, int], int]]],
             ends: Mapping[tuple[str, int], int]) -> list[LagRow]:
    """(group, topic, partition, lag) of every committed partition with a known end (group/lag.py)."""
    return [(group, tp[0], tp[1], lag) for group, _, committed in groups for tp, lag in group_lags(committed, ends)]


def share_figures(groups: Iterable[ShareGroup], now_ms: int) -> list[ShareGroupFigures]:
    """Per share group: its counters summed over partitions, the oldest unsettled record's age,
    and each partition's in-flight records (SharePartition.describe, as `queues describe`)."""
    out = []
    for g in groups:
        acked = redelivered = dead = oldest = 0
        in_flight = []
        for (topic, p), sp in sorted(g.partitions.items()):
            d = sp.describe(now_ms)
            acked += sp.counters.acknowledged
            redelivered += sp.counters.redelivered
            dead += sp.counters.dead_lettered
            oldest = max(oldest, d["oldest_unsettled_age_ms"])
            in_flight.append((topic, p, d["in_flight"]))
        out.append(ShareGroupFigures(g.name, acked, redelivered, dead, oldest, tuple(in_flight)))
    return out


def _capped(rows: list[Any], bound: int, metric: str, dropped: dict[str, int]) -> list[Any]:
    if len(rows) > bound:
        dropped[metric] = dropped.get(metric, 0) + len(rows) - bound
        return rows[:bound]
    return rows


async def _consumer_figures(coordinator: GroupCoordinator, snap: ClusterSnapshot) -> None:
    groups = _capped(coordinator.consumer_groups(), MAX_GROUPS, "logbroker_consumer_group_members", snap.dropped)
    snap.group_members = [(g, members) for g, members, _ in groups]
    ends = await coordinator.high_watermarks(wanted_partitions(c for _, _, c in groups), LAG_LOOKUP_TIMEOUT_S)
    snap.group_lag = _capped(lag_rows(groups, ends), MAX_PARTITION_SERIES, "logbroker_consumer_group_lag",
                             snap.dropped)


def _share_figures(broker: Broker, snap: ClusterSnapshot) -> None:
    groups = [g for shard in broker.coordinator.loaded_shards() for _, g in sorted(shard.share_groups.items())]
    groups = _capped(groups, MAX_GROUPS, "logbroker_share_group_acknowledged_total", snap.dropped)
    figures = share_figures(groups, broker.share_coordinator.clock.now_ms())
    budget = MAX_PARTITION_SERIES
    for i, f in enumerate(figures):
        if len(f.in_flight) > budget:
            snap.dropped["logbroker_share_group_in_flight"] = (snap.dropped.get("logbroker_share_group_in_flight", 0)
                                                               + len(f.in_flight) - budget)
            figures[i] = ShareGroupFigures(f.group, f.acknowledged, f.redelivered, f.dead_lettered,
                                           f.oldest_unsettled_age_ms, f.in_flight[:budget])
        budget -= len(figures[i].in_flight)
    snap.share_groups = figures


async def cluster_snapshot(broker: Broker) -> ClusterSnapshot:
    """The figures a scrape reports; run on the broker's event loop."""
    rm = broker.replica_manager
    snap = ClusterSnapshot(isr_shrinks=rm.isr_shrinks_total, isr_expands=rm.isr_expands_total,
                           throttled_partitions=rm.fetchers.throttled_partitions(),
                           throttled_bytes=rm.fetchers.throttled_bytes_total())
    for p in rm.partitions.values():
        snap.leader_partitions += p.role is Role.LEADER
        snap.replica_partitions += p.role is not Role.NONE
    member = broker.cluster
    if member is None:
        snap.active_controller = 1
    else:
        snap.active_controller = int(member.controller is not None and member.controller.is_active)
        snap.zk_state = member.zk_session_state.lower()
    active = getattr(broker, "active_clients", None)
    if active is not None:
        snap.active = {kind: active.counts(kind) for kind in (PRODUCERS, CONSUMERS)}
    _share_figures(broker, snap)
    await _consumer_figures(broker.coordinator, snap)
    return snap


class ClusterCollector(Collector):
    def __init__(self, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        self._broker = broker
        self._loop = loop

    def _read(self) -> ClusterSnapshot | None:
        return read_on_loop(cluster_snapshot(self._broker), self._loop, SCRAPE_TIMEOUT_S, "cluster metrics snapshot")

    def collect(self) -> Iterator[Metric]:
        snap = self._read()
        yield GaugeMetricFamily("logbroker_cluster_metrics_up", "1 if the broker's event loop answered the "
                                "cluster metrics scrape", value=0 if snap is None else 1)
        if snap is None:
            return
        yield from _cluster_metrics(snap)
        yield from _consumer_metrics(snap)
        yield from _share_metrics(snap)
        yield from _business_metrics(snap)


def _cluster_metrics(snap: ClusterSnapshot) -> Iterator[Metric]:
    yield CounterMetricFamily("logbroker_isr_shrinks", "ISR changes committed by this broker as leader that "
                              "removed a replica", value=snap.isr_shrinks)
    yield CounterMetricFamily("logbroker_isr_expands", "ISR changes committed by this broker as leader that "
                              "added a replica", value=snap.isr_expands)
    yield GaugeMetricFamily("logbroker_leader_partitions", "hosted partitions this broker leads",
                            value=snap.leader_partitions)
    yield GaugeMetricFamily("logbroker_replica_partitions", "hosted partition replicas, leaders included",
                            value=snap.replica_partitions)
    yield GaugeMetricFamily("logbroker_replication_throttled_partitions", "partitions fetched under a "
                            "reassignment's replication throttle now", value=snap.throttled_partitions)
    yield CounterMetricFamily("logbroker_replication_throttled_bytes", "bytes fetched as a throttled follower "
                              "while behind the leader", value=snap.throttled_bytes)
    yield GaugeMetricFamily("logbroker_active_controller", "1 on the controller (a standalone broker: 1)",
                            value=snap.active_controller)
    zk = GaugeMetricFamily("logbroker_zookeeper_session_state", "1 for the ZooKeeper session's state "
                           "(standalone: state=\"standalone\")", labels=["state"])
    for state in (STANDALONE,) if snap.zk_state == STANDALONE else ZK_STATES:
        zk.add_metric([state], int(state == snap.zk_state))
    yield zk
    dropped = GaugeMetricFamily("logbroker_metrics_series_dropped", "series left out of this scrape by the "
                                "cardinality bounds", labels=["metric"])
    for metric, n in sorted(snap.dropped.items()):
        dropped.add_metric([metric], n)
    yield dropped


def _consumer_metrics(snap: ClusterSnapshot) -> Iterator[Metric]:
    members = GaugeMetricFamily("logbroker_consumer_group_members", "members of each consumer group this broker "
                                "coordinates", labels=["group"])
    for group, n in snap.group_members:
        members.add_metric([group], n)
    yield members
    lag = GaugeMetricFamily("logbroker_consumer_group_lag", "records between the committed offset and the high "
                            "watermark", labels=["group", "topic", "partition"])
    for group, topic, partition, n in snap.group_lag:
        lag.add_metric([group, topic, str(partition)], n)
    yield lag


def _share_metrics(snap: ClusterSnapshot) -> Iterator[Metric]:
    in_flight = GaugeMetricFamily("logbroker_share_group_in_flight", "unsettled records of a share group's "
                                  "window", labels=["group", "topic", "partition"])
    acked = CounterMetricFamily("logbroker_share_group_acknowledged", "records acknowledged since the "
                                "coordinator loaded the group", labels=["group"])
    redelivered = CounterMetricFamily("logbroker_share_group_redeliveries", "records handed out again since "
                                      "the coordinator loaded the group", labels=["group"])
    dead = CounterMetricFamily("logbroker_share_group_dead_letters", "records archived as dead letters since "
                               "the coordinator loaded the group", labels=["group"])
    oldest = GaugeMetricFamily("logbroker_share_group_oldest_unsettled_age_seconds", "age of the oldest "
                               "unsettled record", labels=["group"])
    for f in snap.share_groups:
        for topic, partition, n in f.in_flight:
            in_flight.add_metric([f.group, topic, str(partition)], n)
        acked.add_metric([f.group], f.acknowledged)
        redelivered.add_metric([f.group], f.redelivered)
        dead.add_metric([f.group], f.dead_lettered)
        oldest.add_metric([f.group], f.oldest_unsettled_age_ms / 1000)
    yield from (in_flight, acked, redelivered, dead, oldest)


def _business_metrics(snap: ClusterSnapshot) -> Iterator[Metric]:
    for kind in (PRODUCERS, CONSUMERS):
        family = GaugeMetricFamily(f"logbroker_topic_active_{kind}", f"distinct clients seen as {kind} of the "
                                   "topic on this broker in the last minute", labels=["topic"])
        for topic, n in sorted(snap.active.get(kind, {}).items()):
            family.add_metric([topic], n)
        yield family

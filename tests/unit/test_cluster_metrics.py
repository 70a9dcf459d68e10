"""The figures server/cluster_metrics.py builds from pure state: lag rows and share groups."""

from __future__ import annotations

from prometheus_client.core import Metric

from logbroker.group.share_group import ShareGroup
from logbroker.group.share_partition import AckType, SharePartition
from logbroker.group.share_settings import ShareSettings
from logbroker.server.cluster_metrics import (
    ClusterSnapshot,
    _business_metrics,
    _cluster_metrics,
    _share_metrics,
    lag_rows,
    share_figures,
)

S = ShareSettings(max_in_flight_records=100)


def test_lag_rows_per_group_and_partition() -> None:
    groups = [("a", 2, {("t", 0): 3, ("t", 1): 9}), ("b", 0, {("t", 0): 10, ("u", 0): 0})]
    ends = {("t", 0): 10, ("t", 1): 9}  # u-0: no known end (no leader): no row
    assert lag_rows(groups, ends) == [("a", "t", 0, 7), ("a", "t", 1, 0), ("b", "t", 0, 0)]


def test_share_figures_sum_counters_and_take_the_oldest_unsettled_record() -> None:
    now = 1_000_000
    g = ShareGroup("jobs", S)
    p0 = SharePartition(S, 0)
    p0.add_records(0, 9, timestamp_ms=now - 5_000)
    taken, _ = p0.acquire("m1", 4, now)
    assert [(a.first_offset, a.last_offset) for a in taken] == [(0, 3)]
    p0.acknowledge("m1", 0, 1, AckType.ACCEPT, now)
    p0.acknowledge("m1", 2, 2, AckType.RELEASE, now)
    later = now + 60_000  # past the release's backoff
    again, _ = p0.acquire("m1", 1, later)
    assert [(a.first_offset, a.delivery_count) for a in again] == [(2, 2)]  # a redelivery
    p1 = SharePartition(S, 0)
    p1.add_records(0, 1, timestamp_ms=now)
    g.partitions = {("t", 0): p0, ("t", 1): p1}
    [f] = share_figures([g], later)
    assert f.group == "jobs"
    assert (f.acknowledged, f.redelivered, f.dead_lettered) == (2, 1, 0)
    assert f.in_flight == (("t", 0, 8), ("t", 1, 2))
    assert f.oldest_unsettled_age_ms == 65_000  # offset 2, written 5 s before `now`


def _samples(families: list[Metric]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(s.name, tuple(sorted(s.labels.values()))): s.value for f in families for s in f.samples}


def test_standalone_shows_one_zookeeper_state_and_a_controller() -> None:
    got = _samples(list(_cluster_metrics(ClusterSnapshot(active_controller=1))))
    assert got[("logbroker_zookeeper_session_state", ("standalone",))] == 1
    assert [k for k in got if k[0] == "logbroker_zookeeper_session_state"] == [
        ("logbroker_zookeeper_session_state", ("standalone",))]
    assert got[("logbroker_active_controller", ())] == 1


def test_cluster_mode_shows_every_session_state_one_of_them_set() -> None:
    got = _samples(list(_cluster_metrics(ClusterSnapshot(zk_state="suspended"))))
    states = {k[1][0]: v for k, v in got.items() if k[0] == "logbroker_zookeeper_session_state"}
    assert states == {"connected": 0, "suspended": 1, "lost": 0, "none": 0}


def test_share_and_business_series_names_follow_the_conventions() -> None:
    now = 10_000
    g = ShareGroup("jobs", S)
    g.partitions = {("t", 0): SharePartition(S, 0)}
    snap = ClusterSnapshot(share_groups=share_figures([g], now), active={"producers": {"t": 2}})
    names = {k[0] for k in _samples(list(_share_metrics(snap)) + list(_business_metrics(snap)))}
    assert names == {"logbroker_share_group_in_flight", "logbroker_share_group_acknowledged_total",
                     "logbroker_share_group_redeliveries_total", "logbroker_share_group_dead_letters_total",
                     "logbroker_share_group_oldest_unsettled_age_seconds", "logbroker_topic_active_producers"}

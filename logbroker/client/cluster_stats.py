"""`logbroker cluster stats`: one screen of the whole cluster, computed from what an Admin sees (pure).

A `Snapshot` is one look at the cluster: `Admin.describe_cluster()` (the live, registered brokers
and the controller) and `Admin.describe_topics()` (every partition's leader, replicas, ISR, offsets
and size on its leader), with the monotonic time it was taken. `stats(current, previous)` turns it
into the screen's data (JSON-ready); `render_text` formats it. No I/O here: the CLI
(logbroker/cli_stats.py) takes the snapshots and redraws.

- brokers: the registered brokers (alive) plus any broker a replica list names that is not
  registered (not alive), with the controller marked;
- health: partitions offline (no leader, or a leader that is not registered), under-replicated
  (ISR smaller than the replica set) and under min ISR (ISR smaller than the topic's
  `min_insync_replicas`, default 1);
- topics: partitions, bytes (sum of the partitions' log sizes on their leaders), end offset (the sum
  of the high watermarks: what consumers can read) and records;
- the top `top` partitions by bytes;
- rates, when there is a previous snapshot: per topic and for the top partitions, records/s = the
  difference of high watermarks over the elapsed time, over the partitions present in both (a
  partition whose offset went back, a recreated topic, counts 0), and bytes/s likewise (a partition
  that shrank, by retention, counts 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from logbroker.client.admin import PartitionInfo, TopicDescription

TOP_DEFAULT = 10
TOP_MAX = 1000
DEFAULT_MIN_INSYNC_REPLICAS = 1


@dataclass(frozen=True)
class Snapshot:
    taken_at_s: float  # monotonic clock
    cluster: Mapping[str, Any]  # Admin.describe_cluster()
    topics: Sequence[TopicDescription]


@dataclass(frozen=True)
class Health:
    partitions: int = 0
    offline: int = 0
    under_replicated: int = 0
    under_min_isr: int = 0


def _min_isr(topic: TopicDescription) -> int:
    try:
        return int(topic.config.get("min_insync_replicas", DEFAULT_MIN_INSYNC_REPLICAS))
    except ValueError:
        return DEFAULT_MIN_INSYNC_REPLICAS


def health(topics: Sequence[TopicDescription], alive: set[int]) -> Health:
    """The health counts of `topics` given the registered broker ids `alive`."""
    total = offline = under = under_min = 0
    for t in topics:
        min_isr = _min_isr(t)
        for p in t.partitions:
            total += 1
            if p.leader < 0 or p.leader not in alive:
                offline += 1
            if len(p.isr) < len(p.replicas):
                under += 1
            if len(p.isr) < min_isr:
                under_min += 1
    return Health(total, offline, under, under_min)


def brokers(cluster: Mapping[str, Any], topics: Sequence[TopicDescription]) -> list[dict[str, Any]]:
    """The registered brokers (alive) and the ones replicas name but that are not registered."""
    controller = cluster.get("controller_id", -1)
    out = {b["broker_id"]: {"broker_id": b["broker_id"], "host": b["host"], "port": b["port"], "rack": b["rack"],
                            "controller": b["broker_id"] == controller, "alive": True}
           for b in cluster.get("brokers", ())}
    for t in topics:
        for p in t.partitions:
            for r in p.replicas:
                if r not in out:
                    out[r] = {"broker_id": r, "host": "", "port": 0, "rack": "", "controller": r == controller,
                              "alive": False}
    return [out[k] for k in sorted(out)]


def _growth_per_s(now: int, before: int | None, elapsed_s: float | None) -> float | None:
    if before is None or elapsed_s is None or elapsed_s <= 0:
        return None
    return max(0, now - before) / elapsed_s


def _partition_map(snapshot: Snapshot) -> dict[tuple[str, int], PartitionInfo]:
    return {(t.name, p.partition): p for t in snapshot.topics for p in t.partitions}


def top_partitions(topics: Sequence[TopicDescription], n: int) -> list[tuple[str, PartitionInfo]]:
    """The `n` biggest partitions by bytes (ties: by topic, then partition)."""
    every = [(t.name, p) for t in topics for p in t.partitions]
    every.sort(key=lambda tp: (-tp[1].size_bytes, tp[0], tp[1].partition))
    return every[:max(0, n)]


def _rates(current: Snapshot, previous: Snapshot | None) -> tuple[float | None, dict[tuple[str, int], PartitionInfo]]:
    if previous is None:
        return None, {}
    return current.taken_at_s - previous.taken_at_s, _partition_map(previous)


def _topic_row(t: TopicDescription, before: Mapping[tuple[str, int], PartitionInfo],
               elapsed_s: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": t.name, "partitions": len(t.partitions), "size_bytes": sum(p.size_bytes for p in t.partitions),
        "end_offset": sum(p.high_watermark for p in t.partitions),
        "records": sum(max(0, p.high_watermark - p.log_start_offset) for p in t.partitions),
        "records_per_sec": None, "bytes_per_sec": None}
    if elapsed_s is not None and elapsed_s > 0:
        pairs = [(p, before[(t.name, p.partition)]) for p in t.partitions if (t.name, p.partition) in before]
        row["records_per_sec"] = sum(max(0, p.high_watermark - b.high_watermark) for p, b in pairs) / elapsed_s
        row["bytes_per_sec"] = sum(max(0, p.size_bytes - b.size_bytes) for p, b in pairs) / elapsed_s
    return row


def stats(current: Snapshot, previous: Snapshot | None = None, top: int = TOP_DEFAULT) -> dict[str, Any]:
    """The screen's data (JSON-ready): brokers, health, topics, top partitions, rates with `previous`."""
    elapsed_s, before = _rates(current, previous)
    alive = {b["broker_id"] for b in current.cluster.get("brokers", ())}
    h = health(current.topics, alive)
    top_rows = []
    for name, p in top_partitions(current.topics, top):
        b = before.get((name, p.partition))
        top_rows.append({"topic": name, "partition": p.partition, "leader": p.leader, "size_bytes": p.size_bytes,
                         "end_offset": p.high_watermark,
                         "records_per_sec": _growth_per_s(p.high_watermark, b.high_watermark if b else None,
                                                          elapsed_s)})
    return {
        "cluster_id": current.cluster.get("cluster_id", ""),
        "controller_id": current.cluster.get("controller_id", -1),
        "brokers": brokers(current.cluster, current.topics),
        "health": {"partitions": h.partitions, "offline": h.offline, "under_replicated": h.under_replicated,
                   "under_min_isr": h.under_min_isr},
        "topic_count": len(current.topics),
        "topics": [_topic_row(t, before, elapsed_s) for t in sorted(current.topics, key=lambda t: t.name)],
        "top_partitions": top_rows,
        "elapsed_s": elapsed_s,
    }


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def render_text(s: Mapping[str, Any]) -> str:
    """The screen, as text (one string, lines ending in newlines)."""
    h = s["health"]
    lines = [f"Cluster: {s['cluster_id'] or '-'}  Controller: {s['controller_id']}  "
             f"Brokers: {sum(1 for b in s['brokers'] if b['alive'])}/{len(s['brokers'])} alive  "
             f"Topics: {s['topic_count']}  Partitions: {h['partitions']}",
             f"Health: offline {h['offline']}  under-replicated {h['under_replicated']}  "
             f"under-min-ISR {h['under_min_isr']}",
             "", f"{'BROKER':>6} {'ADDRESS':<24} {'RACK':<10} STATE"]
    for b in s["brokers"]:
        address = f"{b['host']}:{b['port']}" if b["host"] else "-"
        state = ("alive" if b["alive"] else "DOWN") + (" controller" if b["controller"] else "")
        lines.append(f"{b['broker_id']:>6} {address:<24} {b['rack'] or '-':<10} {state}")
    lines += ["", f"{'TOPIC':<32} {'PARTS':>5} {'BYTES':>14} {'END OFFSET':>14} {'RECORDS/S':>12} {'BYTES/S':>14}"]
    for t in s["topics"]:
        lines.append(f"{t['name']:<32} {t['partitions']:>5} {t['size_bytes']:>14,} {t['end_offset']:>14,} "
                     f"{_rate(t['records_per_sec']):>12} {_rate(t['bytes_per_sec']):>14}")
    lines += ["", f"{'TOP PARTITIONS BY BYTES':<36} {'LEADER':>6} {'BYTES':>14} {'END OFFSET':>14} {'RECORDS/S':>12}"]
    for p in s["top_partitions"]:
        name = f"{p['topic']}-{p['partition']}"
        lines.append(f"{name:<36} {p['leader']:>6} {p['size_bytes']:>14,} {p['end_offset']:>14,} "
                     f"{_rate(p['records_per_sec']):>12}")
    return "\n".join(lines) + "\n"

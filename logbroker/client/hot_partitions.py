"""Hot partitions across the cluster, from every broker's DescribeHotPartitions answer (pure).

Each broker answers for the partitions it leads (server/apis/heat.py); `merge` keeps one row per
partition (mid-failover two brokers may answer for one: the one with more bytes in per second,
the live leader) and orders them hottest first: bytes in per second, then bytes out per second.
`render_text` is `logbroker topics hot`'s table; `key_text` shows a key as text when it is
printable UTF-8, else as hex (`0x...`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class HotKey:
    key: bytes
    share: float  # estimated share of the partition's sampled records
    error: float  # the share may be over-estimated by up to this
    truncated: bool = False  # `key` is the prefix of a longer key


@dataclass(frozen=True)
class HotPartition:
    topic: str
    partition: int
    leader: int  # the broker that answered
    bytes_in_per_sec: float
    records_in_per_sec: float
    bytes_out_per_sec: float
    records_out_per_sec: float
    bytes_in_total: int = 0
    records_in_total: int = 0
    bytes_out_total: int = 0
    records_out_total: int = 0
    sampled_batches: int = 0
    keys: list[HotKey] = field(default_factory=list)


def from_response(broker_id: int, resp: Any) -> list[HotPartition]:
    """A DescribeHotPartitionsResponse's rows."""
    return [HotPartition(p.topic, p.partition, broker_id, p.bytes_in_per_sec, p.records_in_per_sec,
                         p.bytes_out_per_sec, p.records_out_per_sec, p.bytes_in_total, p.records_in_total,
                         p.bytes_out_total, p.records_out_total, p.sampled_batches,
                         [HotKey(k.key, k.share, k.error, k.truncated) for k in p.keys])
            for p in resp.partitions]


def merge(rows: Iterable[HotPartition], top: int) -> list[HotPartition]:
    best: dict[tuple[str, int], HotPartition] = {}
    for r in rows:
        seen = best.get((r.topic, r.partition))
        if seen is None or r.bytes_in_per_sec > seen.bytes_in_per_sec:
            best[(r.topic, r.partition)] = r
    ordered = sorted(best.values(), key=lambda r: (-r.bytes_in_per_sec, -r.bytes_out_per_sec, r.topic, r.partition))
    return ordered[: max(0, top)]


def key_text(key: bytes) -> str:
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + key.hex()
    return text if text.isprintable() else "0x" + key.hex()


def as_json(rows: list[HotPartition]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = asdict(r)
        d["keys"] = [{"key": key_text(k.key), "key_hex": k.key.hex(), "share": k.share, "error": k.error,
                      "truncated": k.truncated} for k in r.keys]
        out.append(d)
    return out


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def render_text(rows: list[HotPartition]) -> str:
    if not rows:
        return "no partition traffic seen by the leaders yet\n"
    lines = [f"{'TOPIC':<24} {'PART':>4} {'LEADER':>6} {'BYTES IN/S':>10} {'RECS IN/S':>10} "
             f"{'BYTES OUT/S':>11} {'RECS OUT/S':>10}  TOP KEYS (share of sampled records)"]
    for r in rows:
        keys = ", ".join(f"{key_text(k.key)}{'…' if k.truncated else ''} {k.share:.0%}" for k in r.keys)
        lines.append(f"{r.topic:<24} {r.partition:>4} {r.leader:>6} {_human(r.bytes_in_per_sec):>10} "
                     f"{_human(r.records_in_per_sec):>10} {_human(r.bytes_out_per_sec):>11} "
                     f"{_human(r.records_out_per_sec):>10}  {keys or '-'}")
    return "\n".join(lines) + "\n"

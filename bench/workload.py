"""A workload: what to send, how fast, for how long — read from `bench/workloads/<name>.toml`.

In the spirit of the OpenMessaging Benchmark: the file says what happens, the driver says how a
system does it. A `[smoke]` table overrides top-level keys for the 5-second CI version, and an
`[options.<system>]` table passes client settings to one driver (e.g. logbroker's `linger_ms`).

Phases (`mode`):
- `sequential`: producers run warm-up + duration, then consumers read the whole backlog. Each side
  gets the machine to itself, which on 2 cores is the only way to see each one's ceiling.
- `concurrent`: consumers tail while producers run (end-to-end latency needs this).
- `backlog_records > 0` (queue-ack): as `sequential`, but the producers send exactly that many
  records (the backlog), not for a duration.
- `requires = "queues"` (queue-ack): the consumers share one queue (a share group, a RabbitMQ queue, a
  JetStream work-queue consumer) and acknowledge every message individually; the drain is timed
  over the acknowledgements.
- `requires = "request-reply"` (request-reply): not these phases at all: bench/request_reply.py
  (responders, then a requester at `target_rate` and at its maximum).
- `preload_bytes > 0` (consume-5gb): one server per workload, the log is filled once with the
  driver's fastest path, then each of the `runs` is a fresh consumer reading all of it.
- `filter` (filtered-consume, logbroker only, with `preload_bytes`): one record in `match_every`
  carries the header type=invoice (the others type=receipt), and each pass's consumer (a fresh
  group) reads with the server-side filter `filter`; the pass reports records delivered per second
  and records scanned per second (delivered/s x the records per match).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

WORKLOADS_DIR = Path(__file__).parent / "workloads"
KEY_DISTRIBUTIONS = ("none", "uniform", "hot")
MODES = ("sequential", "concurrent")
REQUIREMENTS = ("cluster", "groups", "queues", "request-reply")


class WorkloadError(ValueError):
    """A workload file that does not parse or has a bad value."""


@dataclass(frozen=True)
class Workload:
    name: str
    description: str = ""
    record_size: int = 100
    key_distribution: str = "none"
    hot_key_share: float = 0.9
    key_count: int = 10_000
    partitions: int = 1
    producers: int = 1
    consumers: int = 1
    target_rate: int = 0  # records/s over all producers; 0 = as fast as possible
    duration_s: float = 10.0
    warmup_s: float = 2.0
    acks: str = "1"  # "0", "1" or "all"
    replication_factor: int = 1
    brokers: int = 1  # > 1: a cluster (ZooKeeper + brokers) for systems that have one
    min_insync_replicas: int = 1  # topic config when replication_factor > 1
    zk_session_timeout_ms: int = 6000
    mode: str = "sequential"
    latency: bool = False  # embed a send timestamp in every record, measure end to end
    preload_bytes: int = 0
    backlog_records: int = 0  # > 0: produce exactly this many records (not for duration_s), then drain
    consume_time_limit_s: float = 120.0
    native_requests_per_s: int = 200_000  # redis-native: sizes `redis-benchmark -n` to ~duration_s
    requires: str = ""  # "cluster" | "groups" | ""
    filter: str = ""  # a server-side CEL filter for the consumers (filtered-consume)
    match_every: int = 0  # with filter: one preloaded record in this many has header type=invoice
    systems: tuple[str, ...] = ("logbroker", "nats", "redis")
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def option(self, system: str, key: str, default: Any) -> Any:
        return self.options.get(system, {}).get(key, default)

    @property
    def rate_per_producer(self) -> float:
        return self.target_rate / self.producers if self.target_rate else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["systems"] = list(self.systems)
        return out


def _check(wl: Workload) -> Workload:
    problems = []
    if wl.record_size < 16:
        problems.append("record_size must be >= 16 (a timestamp and a marker live in it)")
    if wl.key_distribution not in KEY_DISTRIBUTIONS:
        problems.append(f"key_distribution must be one of {KEY_DISTRIBUTIONS}")
    if wl.mode not in MODES:
        problems.append(f"mode must be one of {MODES}")
    if wl.requires and wl.requires not in REQUIREMENTS:
        problems.append(f"requires must be one of {REQUIREMENTS}")
    if wl.acks not in ("0", "1", "all"):
        problems.append('acks must be "0", "1" or "all"')
    if min(wl.partitions, wl.producers, wl.consumers, wl.replication_factor, wl.brokers) < 1:
        problems.append("partitions, producers, consumers, replication_factor and brokers must be >= 1")
    if wl.replication_factor > wl.brokers and wl.requires == "cluster":
        problems.append("replication_factor must be <= brokers")
    if not 1 <= wl.min_insync_replicas <= wl.replication_factor:
        problems.append("min_insync_replicas must be between 1 and replication_factor")
    if wl.duration_s <= 0 or wl.warmup_s < 0 or wl.consume_time_limit_s <= 0:
        problems.append("duration_s and consume_time_limit_s must be > 0, warmup_s >= 0")
    if wl.backlog_records < 0 or (wl.backlog_records and wl.mode != "sequential"):
        problems.append("backlog_records must be >= 0, and needs mode = 'sequential'")
    if wl.latency and wl.mode != "concurrent":
        problems.append("latency = true needs mode = 'concurrent'")
    if wl.filter and (wl.match_every < 1 or not wl.preload_bytes or wl.systems != ("logbroker",)):
        problems.append("filter needs match_every >= 1, preload_bytes > 0 and systems = ['logbroker']")
    if problems:
        raise WorkloadError(f"workload {wl.name}: " + "; ".join(problems))
    return wl


def _from_table(name: str, table: dict[str, Any]) -> Workload:
    known = {f.name for f in fields(Workload)}
    unknown = set(table) - known - {"smoke"}
    if unknown:
        raise WorkloadError(f"workload {name}: unknown keys {sorted(unknown)}")
    values = {k: v for k, v in table.items() if k != "smoke"}
    if "acks" in values:
        values["acks"] = str(values["acks"])
    if "systems" in values:
        values["systems"] = tuple(values["systems"])
    for key in ("duration_s", "warmup_s", "consume_time_limit_s", "hot_key_share"):
        if key in values:
            values[key] = float(values[key])
    return Workload(name=name, **values)


def load(name_or_path: str, smoke: bool = False) -> Workload:
    path = Path(name_or_path)
    if not path.suffix:
        path = WORKLOADS_DIR / f"{name_or_path}.toml"
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise WorkloadError(f"no workload {name_or_path!r} (looked for {path})") from None
    except tomllib.TOMLDecodeError as exc:
        raise WorkloadError(f"{path}: {exc}") from None
    wl = _check(_from_table(path.stem, table))
    if smoke:
        overrides = dict(table.get("smoke", {}))
        overrides.setdefault("duration_s", min(wl.duration_s, 3.0))
        overrides.setdefault("warmup_s", min(wl.warmup_s, 0.5))
        overrides.setdefault("consume_time_limit_s", min(wl.consume_time_limit_s, 10.0))
        wl = _check(_from_table(wl.name, {**table, **overrides}))
    return wl


def all_names() -> list[str]:
    return sorted(p.stem for p in WORKLOADS_DIR.glob("*.toml"))

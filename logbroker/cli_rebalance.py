"""`logbroker cluster rebalance [--dry-run | --execute] [--replicas] [--max-moves N] [--format text|json]`:
even out leadership (and, with --replicas, replicas) across the brokers, as a client through --bootstrap.

It reads the cluster through the Admin client (DescribeCluster: the live brokers and their racks;
DescribeTopics: every partition's replicas, leader, ISR, size, and the topic's min ISR) and measures
each partition's bytes in and out per second from its leader's own counters: DescribeHotPartitions
(every live broker answers for the partitions it leads with `bytes_in_total`, what Produce appended,
and `bytes_out_total`, what consumers fetched; server/partition_heat.py) read twice
`--sample-seconds` apart (default 2; 0: not measured, counts only). The questions are grouped by
topic so that every partition fits in each broker's answer (the server's bounds: TOP_MAX partitions,
TOPICS_MAX topics; `_pages`). A partition whose leader changed between the two reads, or that is
missing from one (no traffic seen by its leader yet, a broker that did not answer), falls back to the
growth of its size when both sizes are known (>= 0: the broker answering DescribeTopics reports -1
for a partition it holds no replica of), else 0; bytes out is then 0 (cluster/leader_rates.py). How
many partitions were measured each way is printed (`measured_from` in JSON; when no broker answers
DescribeHotPartitions, or it is refused, every partition falls back and `heat_error` says why). Then it asks the pure
planner (logbroker/cluster/balancer.py, which weighs each leadership by bytes in + bytes out) for a
plan. The plan and its expected effect (per broker: leaders, leader bytes in/s and out/s, replicas
before and after; the spread, max |value - mean| / mean) are printed; nothing changes without
--execute.

--execute applies each move as a reassignment (ReassignPartition): a leadership move reassigns the
partition to the same replicas with the new preferred leader first (the controller finishes it at
once, nothing copied, and elects that leader); a replica move copies to the new replica before the old
one goes. It then polls until every moved partition has its new replicas and leader, at most
`--timeout-seconds` (default 120), and exits 1 if some did not (or were already being reassigned).
Once the moves are done it measures again, the same way over `--sample-seconds`, and reports what
each broker now leads and the leader bytes in and out per second it now carries (`measured_after`, beside
the plan's expected `after`): the rates are measured, not predicted from the rates before the move.
The window starts when the moves have landed, so it may include clients switching to the new
leaders (a producer's first sends after a move wait for its metadata refresh).
`--replication-throttle-bytes-per-sec N` (with --execute; 0, the default: none) is sent with each
reassignment: every replica it adds fetches at most N bytes/s while it is behind the leader (the
follower's fetcher, replication/replica_throttle.py); in-sync replication is never throttled, and
the throttle ends with the reassignment.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from logbroker.cluster.balancer import (
    MAX_MOVES_DEFAULT,
    MAX_MOVES_LIMIT,
    BrokerInfo,
    Move,
    Options,
    PartitionLoad,
    Plan,
    plan,
)
from logbroker.cluster.leader_rates import LeaderCounters, PartitionRate, TopicPartition, rates
from logbroker.errors import LogbrokerError, ReassignmentInProgressError
from logbroker.replication.replica_throttle import REPLICATION_THROTTLE_BYTES_PER_SEC_MAX
from logbroker.server.apis.heat import TOP_MAX as HEAT_TOP_MAX
from logbroker.server.apis.heat import TOPICS_MAX as HEAT_TOPICS_MAX

SAMPLE_DEFAULT_S = 2.0
SAMPLE_MAX_S = 600.0
TIMEOUT_DEFAULT_S = 120.0
POLL_INTERVAL_S = 0.2
EXIT_OK = 0
EXIT_INCOMPLETE = 1
HEAT_KEYS = 1  # keys per partition in DescribeHotPartitions: not used here; 0 would mean the server's default (5)


class RebalanceCliError(LogbrokerError):
    """A usage problem found after parsing (printed as one line by cli.main, exit 1)."""


def _admin(args: argparse.Namespace) -> Any:
    from logbroker.cli_tls import sasl_from_args, tls_from_args
    from logbroker.client import Admin

    return Admin(args.bootstrap, tls=tls_from_args(args), sasl=sasl_from_args(args))


def _min_isr(config: dict[str, str]) -> int:
    try:
        return int(config.get("min_insync_replicas", "1"))
    except ValueError:
        return 1


def _pages(topics: Sequence[Any]) -> list[tuple[list[str], int]]:
    """The topics grouped for DescribeHotPartitions, each group with the `top` to ask for: at most
    HEAT_TOPICS_MAX names and HEAT_TOP_MAX partitions a group (the server's bounds on one answer),
    so every partition of the group fits in each broker's answer; a topic with more partitions than
    HEAT_TOP_MAX is a group of its own (a broker leading more of it than that answers for its
    hottest HEAT_TOP_MAX; the others fall back to their size growth)."""
    pages: list[tuple[list[str], int]] = []
    names: list[str] = []
    count = 0
    for t in topics:
        n = len(t.partitions)
        if names and (count + n > HEAT_TOP_MAX or len(names) >= HEAT_TOPICS_MAX):
            pages.append((names, max(1, min(count, HEAT_TOP_MAX))))
            names, count = [], 0
        names.append(t.name)
        count += n
    if names:
        pages.append((names, max(1, min(count, HEAT_TOP_MAX))))
    return pages


def _heat(admin: Any, pages: Sequence[tuple[list[str], int]]) -> dict[TopicPartition, LeaderCounters]:
    """One sample of the leaders' counters (every live broker answers for the partitions it leads)."""
    out: dict[TopicPartition, LeaderCounters] = {}
    for names, top in pages:
        for r in admin.describe_hot_partitions(names, top=top, keys=HEAT_KEYS):
            out[(r.topic, r.partition)] = LeaderCounters(r.leader, r.bytes_in_total, r.bytes_out_total)
    return out


@dataclass
class Sample:
    """The planner's input and how its rates were measured (`sources`: partitions per
    cluster/leader_rates.py source; `heat_error`: why the leaders' counters were not read, if so)."""

    brokers: list[BrokerInfo]
    partitions: list[PartitionLoad]
    sources: dict[str, int] = field(default_factory=dict)
    heat_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"sources": dict(self.sources), **({"heat_error": self.heat_error} if self.heat_error else {})}


def sample(admin: Any, sample_s: float, include_internal: bool) -> Sample:
    """The live brokers (and any a replica list names, as dead) and the partitions with their bytes
    in and out per second over `sample_s` (0: not measured, counted 0): the leaders' counters
    (DescribeHotPartitions) read twice `sample_s` apart, each partition's rates from their deltas,
    falling back to its size growth (cluster/leader_rates.py). If no broker answers the counters (or
    refuses), every partition falls back, and `heat_error` says why."""
    def topics() -> list[Any]:
        return [t for t in admin.describe_topics() if include_internal or not t.name.startswith("__")]

    errors: list[str] = []

    def heat(pages: list[tuple[list[str], int]]) -> dict[TopicPartition, LeaderCounters]:
        try:
            return _heat(admin, pages)
        except LogbrokerError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return {}

    current = topics()
    measured: dict[TopicPartition, PartitionRate] = {}
    if sample_s > 0:
        pages = _pages(current)
        sizes_first = {(t.name, p.partition): p.size_bytes for t in current for p in t.partitions}
        first = heat(pages)
        started = time.monotonic()
        time.sleep(sample_s)  # the measuring window
        second = heat(pages)
        elapsed_s = max(time.monotonic() - started, 1e-6)  # about each broker's time between its two answers
        current = topics()
        sizes_second = {(t.name, p.partition): p.size_bytes for t in current for p in t.partitions}
        measured = rates(list(sizes_second), first, second, sizes_first, sizes_second, elapsed_s)
    cluster = admin.describe_cluster()
    brokers = {b["broker_id"]: BrokerInfo(b["broker_id"], b.get("rack") or "", True) for b in cluster["brokers"]}
    partitions = []
    sources: dict[str, int] = {}
    for t in current:
        for p in t.partitions:
            for r in p.replicas:
                brokers.setdefault(r, BrokerInfo(r, "", False))
            rate = measured.get((t.name, p.partition), PartitionRate(0.0, 0.0, "none"))
            sources[rate.source] = sources.get(rate.source, 0) + 1
            partitions.append(PartitionLoad(t.name, p.partition, tuple(p.replicas), p.leader, tuple(p.isr),
                                            _min_isr(t.config), rate.bytes_in_per_sec, rate.bytes_out_per_sec,
                                            p.size_bytes))
    return Sample([brokers[b] for b in sorted(brokers)], partitions, sources, errors[0] if errors else "")


def gather(admin: Any, sample_s: float, include_internal: bool) -> tuple[list[BrokerInfo], list[PartitionLoad]]:
    """The planner's input (`sample`, without how it was measured)."""
    s = sample(admin, sample_s, include_internal)
    return s.brokers, s.partitions


def measure(admin: Any, sample_s: float, include_internal: bool) -> dict[str, Any]:
    """The cluster as it is now, measured as the plan's input is (`sample`): per live broker the
    partitions it leads and their bytes in and out per second over `sample_s` (0: counts only), the
    spread of each figure, and how the rates were measured (`measured_after` of `--execute`)."""
    s = sample(admin, sample_s, include_internal)
    now = plan(s.brokers, s.partitions, Options(max_moves=0))
    return {"sample_seconds": sample_s, "brokers": [b.as_dict() for b in now.before],
            "spread": {name: figures["before"] for name, figures in now.spread().items()},
            "measured_from": s.as_dict()}


def _render_sources(m: dict[str, Any]) -> str:
    sources = ", ".join(f"{n} from {src}" for src, n in sorted(m.get("sources", {}).items()))
    error = f" (leaders' counters not read: {m['heat_error']})" if m.get("heat_error") else ""
    return f"rates measured: {sources or 'no partitions'}{error}"


def _render_measured(m: dict[str, Any]) -> list[str]:
    if "error" in m:
        return [f"measured after the moves: not measured ({m['error']})"]
    lines = [f"measured after the moves (over {m['sample_seconds']:g} s):"]
    lines += [f"{b['broker_id']:>6} {b['leaders']:>6} leaders {b['leader_bytes_in_per_sec']:>11.0f} leader bytes in/s "
              f"{b['leader_bytes_out_per_sec']:>11.0f} leader bytes out/s" for b in m["brokers"]]
    lines.append("measured spread: " + ", ".join(f"{k} {v:.2f}" for k, v in m["spread"].items()))
    if "measured_from" in m:
        lines.append(_render_sources(m["measured_from"]))
    return lines


def render_text(data: dict[str, Any]) -> str:
    moves = data["moves"]
    kinds = {k: sum(1 for m in moves if m["kind"] == k) for k in ("leader", "replicas")}
    lines = [f"plan: {len(moves)} moves ({kinds['leader']} leadership, {kinds['replicas']} replica)"]
    for m in moves:
        lines.append(f"  {m['topic']}-{m['partition']}: {m['kind']:<8} leader {m['leader_before']} -> "
                     f"{m['leader_after']}, replicas {m['replicas_before']} -> {m['replicas_after']}")
    lines.append(f"{'broker':>6} {'leaders':>15} {'leader bytes in/s':>25} {'leader bytes out/s':>25} "
                 f"{'replicas':>15}")
    for b, a in zip(data["before"], data["after"], strict=True):
        lines.append(f"{b['broker_id']:>6} {b['leaders']:>6} -> {a['leaders']:<6} "
                     f"{b['leader_bytes_in_per_sec']:>11.0f} -> {a['leader_bytes_in_per_sec']:<11.0f} "
                     f"{b['leader_bytes_out_per_sec']:>11.0f} -> {a['leader_bytes_out_per_sec']:<11.0f} "
                     f"{b['replicas']:>6} -> {a['replicas']:<6}")
    s = data["spread"]
    lines.append("spread (max deviation / mean): " + ", ".join(
        f"{k} {v['before']:.2f} -> {v['after']:.2f}" for k, v in s.items()))
    if "measured_from" in data:
        lines.append(_render_sources(data["measured_from"]))
    for why in data["skipped"]:
        lines.append(f"skipped {why}")
    if "result" in data:
        r = data["result"]
        lines.append(f"executed: {r['done']} done, {len(r['failed'])} not done")
        lines += [f"  {f}" for f in r["failed"]]
    if "measured_after" in data:
        lines += _render_measured(data["measured_after"])
    return "\n".join(lines) + "\n"


def _settled(admin: Any, moves: Sequence[Move]) -> set[tuple[str, int]]:
    """The moved partitions that have their new replicas and leader."""
    want = {(m.topic, m.partition): m for m in moves}
    names = sorted({m.topic for m in moves})
    out = set()
    for t in admin.describe_topics(names):
        for p in t.partitions:
            m = want.get((t.name, p.partition))
            if m is not None and tuple(p.replicas) == m.replicas_after and p.leader == m.leader_after:
                out.add((t.name, p.partition))
    return out


def execute(admin: Any, the_plan: Plan, timeout_s: float, throttle_bytes_per_sec: int = 0) -> dict[str, Any]:
    """Start every move (the replicas it adds throttled to `throttle_bytes_per_sec`, 0: not), then wait
    (bounded) until each has landed: {"done": n, "failed": [why]}."""
    failed: list[str] = []
    started: list[Move] = []
    for m in the_plan.moves:
        try:
            admin.reassign_partition(m.topic, m.partition, m.replicas_after,
                                     throttle_bytes_per_sec=throttle_bytes_per_sec)
            started.append(m)
        except ReassignmentInProgressError as exc:
            failed.append(f"{m.topic}-{m.partition}: {exc}")
    deadline = time.monotonic() + timeout_s
    settled: set[tuple[str, int]] = set()
    while started:
        try:
            settled = _settled(admin, started)
        except LogbrokerError:
            pass  # a leader moving under the describe: ask again
        if len(settled) == len(started) or time.monotonic() >= deadline:
            break
        time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
    failed += [f"{m.topic}-{m.partition}: not at replicas {list(m.replicas_after)} with leader {m.leader_after} "
               f"after {timeout_s:g} s" for m in started if (m.topic, m.partition) not in settled]
    return {"done": len(settled), "failed": failed}


def cmd_cluster_rebalance(args: argparse.Namespace) -> int:
    if not 0 <= args.max_moves <= MAX_MOVES_LIMIT:
        raise RebalanceCliError(f"--max-moves must be in [0, {MAX_MOVES_LIMIT}], got {args.max_moves}")
    if not 0 <= args.sample_seconds <= SAMPLE_MAX_S:
        raise RebalanceCliError(f"--sample-seconds must be in [0, {SAMPLE_MAX_S:g}], got {args.sample_seconds}")
    if args.timeout_seconds <= 0:
        raise RebalanceCliError(f"--timeout-seconds must be > 0, got {args.timeout_seconds}")
    if not 0 <= args.replication_throttle_bytes_per_sec <= REPLICATION_THROTTLE_BYTES_PER_SEC_MAX:
        raise RebalanceCliError(f"--replication-throttle-bytes-per-sec must be in [0, "
                                f"{REPLICATION_THROTTLE_BYTES_PER_SEC_MAX}], got {args.replication_throttle_bytes_per_sec}")
    with _admin(args) as admin:
        measured = sample(admin, args.sample_seconds, args.include_internal)
        the_plan = plan(measured.brokers, measured.partitions,
                        Options(max_moves=args.max_moves, move_replicas=args.replicas))
        data = the_plan.as_dict()
        data["measured_from"] = measured.as_dict()
        data["executed"] = bool(args.execute)
        code = EXIT_OK
        if args.execute:
            data["result"] = execute(admin, the_plan, args.timeout_seconds, args.replication_throttle_bytes_per_sec)
            code = EXIT_INCOMPLETE if data["result"]["failed"] else EXIT_OK
            try:
                data["measured_after"] = measure(admin, args.sample_seconds, args.include_internal)
            except LogbrokerError as exc:  # the moves are done either way: say why there is no figure
                data["measured_after"] = {"error": str(exc)}
    print(json.dumps(data) if args.format == "json" else render_text(data), end="\n" if args.format == "json" else "",
          flush=True)
    return code


def add_rebalance_parser(clsub: Any, common: argparse.ArgumentParser) -> None:
    """`cluster rebalance` under `cluster`."""
    t = clsub.add_parser("rebalance", parents=[common],
                         help="even out leaders (and with --replicas, replicas) across brokers: "
                              "prints the plan (--dry-run, the default) or runs it (--execute)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="execute", action="store_false", help="print the plan only (default)")
    mode.add_argument("--execute", dest="execute", action="store_true", help="apply the plan and wait for it")
    t.add_argument("--replicas", action="store_true",
                   help="also move replicas between brokers (reassignment: data is copied first)")
    t.add_argument("--max-moves", type=int, default=MAX_MOVES_DEFAULT,
                   help=f"at most N partitions move (default {MAX_MOVES_DEFAULT}, at most {MAX_MOVES_LIMIT})")
    t.add_argument("--sample-seconds", type=float, default=SAMPLE_DEFAULT_S,
                   help=f"measure bytes in and out per partition over this window (default {SAMPLE_DEFAULT_S:g}; 0: "
                        "balance counts only)")
    t.add_argument("--timeout-seconds", type=float, default=TIMEOUT_DEFAULT_S,
                   help=f"--execute: how long to wait for the moves (default {TIMEOUT_DEFAULT_S:g})")
    t.add_argument("--replication-throttle-bytes-per-sec", type=int, default=0,
                   help="--execute: each replica added copies at most N bytes/s until caught up (default 0: "
                        "unthrottled)")
    t.add_argument("--format", choices=["text", "json"], default="text")
    t.add_argument("--include-internal", action="store_true", help="balance internal topics (__consumer_offsets) too")
    t.set_defaults(func=cmd_cluster_rebalance, execute=False)

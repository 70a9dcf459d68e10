"""`logbroker cluster rebalance [--dry-run | --execute] [--replicas] [--max-moves N] [--format text|json]`:
even out leadership (and, with --replicas, replicas) across the brokers, as a client through --bootstrap.

It reads the cluster through the Admin client (DescribeCluster: the live brokers and their racks;
DescribeTopics: every partition's replicas, leader, ISR, size, and the topic's min ISR), twice
`--sample-seconds` apart (default 2; 0: once) to measure each partition's bytes in per second from
the growth of its size on its leader, and asks the pure planner (logbroker/cluster/balancer.py) for a
plan. The plan and its expected effect (per broker: leaders, leader bytes in/s, replicas before and
after; the spread, max |value - mean| / mean) are printed; nothing changes without --execute.

--execute applies each move as a reassignment (ReassignPartition): a leadership move reassigns the
partition to the same replicas with the new preferred leader first (the controller finishes it at
once, nothing copied, and elects that leader); a replica move copies to the new replica before the old
one goes. It then polls until every moved partition has its new replicas and leader, at most
`--timeout-seconds` (default 120), and exits 1 if some did not (or were already being reassigned).
Once the moves are done it measures again, the same way over `--sample-seconds`, and reports what
each broker now leads and the leader bytes in per second it now carries (`measured_after`, beside
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
from logbroker.errors import LogbrokerError, ReassignmentInProgressError
from logbroker.replication.replica_throttle import REPLICATION_THROTTLE_BYTES_PER_SEC_MAX

SAMPLE_DEFAULT_S = 2.0
SAMPLE_MAX_S = 600.0
TIMEOUT_DEFAULT_S = 120.0
POLL_INTERVAL_S = 0.2
EXIT_OK = 0
EXIT_INCOMPLETE = 1


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


def gather(admin: Any, sample_s: float, include_internal: bool) -> tuple[list[BrokerInfo], list[PartitionLoad]]:
    """The planner's input: the live brokers (and any a replica list names, as dead), the partitions
    with their bytes in per second over `sample_s` (0: unknown, counted 0)."""
    def topics() -> list[Any]:
        return [t for t in admin.describe_topics() if include_internal or not t.name.startswith("__")]

    first, started = topics(), time.monotonic()
    sizes: dict[tuple[str, int], int] = {}
    elapsed_s = 0.0
    current = first
    if sample_s > 0:
        sizes = {(t.name, p.partition): p.size_bytes for t in first for p in t.partitions}
        time.sleep(sample_s)  # the measuring window
        current = topics()
        elapsed_s = time.monotonic() - started
    cluster = admin.describe_cluster()
    brokers = {b["broker_id"]: BrokerInfo(b["broker_id"], b.get("rack") or "", True) for b in cluster["brokers"]}
    partitions = []
    for t in current:
        for p in t.partitions:
            for r in p.replicas:
                brokers.setdefault(r, BrokerInfo(r, "", False))
            before = sizes.get((t.name, p.partition))
            rate = max(0, p.size_bytes - before) / elapsed_s if before is not None and elapsed_s > 0 else 0.0
            partitions.append(PartitionLoad(t.name, p.partition, tuple(p.replicas), p.leader, tuple(p.isr),
                                            _min_isr(t.config), rate, 0.0, p.size_bytes))
    return [brokers[b] for b in sorted(brokers)], partitions


def measure(admin: Any, sample_s: float, include_internal: bool) -> dict[str, Any]:
    """The cluster as it is now, measured as the plan's input is (`gather`): per live broker the
    partitions it leads and their bytes in per second over `sample_s` (0: counts only), and the
    spread of each figure (`measured_after` of `--execute`)."""
    now = plan(*gather(admin, sample_s, include_internal), Options(max_moves=0))
    return {"sample_seconds": sample_s, "brokers": [b.as_dict() for b in now.before],
            "spread": {name: figures["before"] for name, figures in now.spread().items()}}


def _render_measured(m: dict[str, Any]) -> list[str]:
    if "error" in m:
        return [f"measured after the moves: not measured ({m['error']})"]
    lines = [f"measured after the moves (over {m['sample_seconds']:g} s):"]
    lines += [f"{b['broker_id']:>6} {b['leaders']:>6} leaders {b['leader_bytes_in_per_sec']:>11.0f} leader bytes in/s"
              for b in m["brokers"]]
    lines.append("measured spread: " + ", ".join(f"{k} {v:.2f}" for k, v in m["spread"].items()))
    return lines


def render_text(data: dict[str, Any]) -> str:
    moves = data["moves"]
    kinds = {k: sum(1 for m in moves if m["kind"] == k) for k in ("leader", "replicas")}
    lines = [f"plan: {len(moves)} moves ({kinds['leader']} leadership, {kinds['replicas']} replica)"]
    for m in moves:
        lines.append(f"  {m['topic']}-{m['partition']}: {m['kind']:<8} leader {m['leader_before']} -> "
                     f"{m['leader_after']}, replicas {m['replicas_before']} -> {m['replicas_after']}")
    lines.append(f"{'broker':>6} {'leaders':>15} {'leader bytes in/s':>25} {'replicas':>15}")
    for b, a in zip(data["before"], data["after"], strict=True):
        lines.append(f"{b['broker_id']:>6} {b['leaders']:>6} -> {a['leaders']:<6} "
                     f"{b['leader_bytes_in_per_sec']:>11.0f} -> {a['leader_bytes_in_per_sec']:<11.0f} "
                     f"{b['replicas']:>6} -> {a['replicas']:<6}")
    s = data["spread"]
    lines.append("spread (max deviation / mean): " + ", ".join(
        f"{k} {v['before']:.2f} -> {v['after']:.2f}" for k, v in s.items()))
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
        brokers, partitions = gather(admin, args.sample_seconds, args.include_internal)
        the_plan = plan(brokers, partitions, Options(max_moves=args.max_moves, move_replicas=args.replicas))
        data = the_plan.as_dict()
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
                   help=f"measure bytes in per partition over this window (default {SAMPLE_DEFAULT_S:g}; 0: "
                        "balance counts only)")
    t.add_argument("--timeout-seconds", type=float, default=TIMEOUT_DEFAULT_S,
                   help=f"--execute: how long to wait for the moves (default {TIMEOUT_DEFAULT_S:g})")
    t.add_argument("--replication-throttle-bytes-per-sec", type=int, default=0,
                   help="--execute: each replica added copies at most N bytes/s until caught up (default 0: "
                        "unthrottled)")
    t.add_argument("--format", choices=["text", "json"], default="text")
    t.add_argument("--include-internal", action="store_true", help="balance internal topics (__consumer_offsets) too")
    t.set_defaults(func=cmd_cluster_rebalance, execute=False)

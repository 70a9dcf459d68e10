"""`python -m bench report`: bench/RESULTS.md and bench/plots/*.png from bench/results/latest.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.progress import say

BENCH_DIR = Path(__file__).parent
PLOTS_DIR = BENCH_DIR / "plots"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
BASE = "logbroker"
CLUSTER = "cluster-rf3-acks-all"
GROUP = "group-12p-3c"
WORKLOAD_ORDER = (
    "max-100b",
    "max-100kb",
    "latency-10k",
    "consume-5gb",
    "group-12p-3c",
    "cluster-rf3-acks-all",
)
SYSTEM_ORDER = ("logbroker", "logbroker-tls", "nats", "redis", "redis-native")
PEERS_PY = ("nats", "redis")
COLORS = {"logbroker": "#1f77b4", "logbroker-tls": "#9467bd", "nats": "#2ca02c", "redis": "#d62728", "redis-native": "#ff7f0e"}


def _n(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "—"
    return f"{a / b:.2f}×"


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _ordered(results: dict[str, Any]) -> dict[str, Any]:
    """Workloads and systems in reading order (known ones first), whatever order the runs wrote."""

    def rank(order: tuple[str, ...], name: str) -> tuple[int, str]:
        return (order.index(name) if name in order else len(order), name)

    return {
        wl: {s: results[wl][s] for s in sorted(results[wl], key=lambda n: rank(SYSTEM_ORDER, n))}
        for wl in sorted(results, key=lambda n: rank(WORKLOAD_ORDER, n))
    }


def _ok(entry: dict[str, Any]) -> bool:
    return "summary" in entry


def _throughput_table(name: str, systems: dict[str, Any], limits: dict[str, Any] | None) -> list[str]:
    base = _get(systems, BASE, "summary")
    rows = [
        "| system | produce rec/s | produce MB/s | consume rec/s | consume MB/s | logbroker ÷ system "
        "(produce / consume) | run spread (produce / consume) | server CPU s (produce / consume) "
        "| server peak RSS MB | server peak RssAnon MB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for system, entry in systems.items():
        if not _ok(entry):
            continue
        s = entry["summary"]
        title = entry.get("title", system)
        if system == "redis-native" and s.get("native"):
            title += f" -P {s['native']['pipeline']} -c {s['native']['clients']}"
        pr, co, srv = s.get("produce") or {}, s.get("consume") or {}, s.get("server", {})
        ratio_p = _ratio(_get(base, "produce", "records_per_s"), pr.get("records_per_s"))
        ratio_c = _ratio(_get(base, "consume", "records_per_s"), co.get("records_per_s"))
        incomplete = "" if co.get("complete", True) else " (incomplete)"
        spread = " / ".join(f"{x['spread'] * 100:.0f} %" if x else "—" for x in (pr, co))
        cpu = " / ".join(_n(srv.get(k), 1) for k in ("produce_cpu_s", "consume_cpu_s"))
        rows.append(
            f"| {title} | {_n(pr.get('records_per_s'))} | {_n(pr.get('mb_per_s'), 1)} | "
            f"{_n(co.get('records_per_s'))}{incomplete} | {_n(co.get('mb_per_s'), 1)} | {ratio_p} / {ratio_c} | "
            f"{spread} | {cpu} | {_n(srv.get('server_peak_rss_mb'))} | {_n(srv.get('server_peak_rss_anon_mb'))} |"
        )
    if limits and base:
        disk, loop = limits["disk_write_fdatasync_mb_s"], limits["loopback_tcp_mb_s"]
        pm, cm = _get(base, "produce", "mb_per_s") or 0, _get(base, "consume", "mb_per_s") or 0
        rows += [
            "",
            f"logbroker as a fraction of the machine: produce {pm:,.1f} MB/s = {pm / disk * 100:.1f} % of the "
            f"disk's fdatasync write rate, {pm / loop * 100:.1f} % of loopback TCP; consume {cm:,.1f} MB/s = "
            f"{cm / loop * 100:.1f} % of loopback TCP.",
        ]
    return rows


def _latency_table(systems: dict[str, Any]) -> list[str]:
    base_p99 = _get(systems, BASE, "summary", "latency_ms", "p99")
    rows = [
        "| system | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms | logbroker p99 ÷ system p99 | "
        "produce rec/s | consume rec/s | server CPU s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for system, entry in systems.items():
        lat = _get(entry, "summary", "latency_ms")
        if not lat:
            continue
        s = entry["summary"]
        rows.append(
            f"| {entry.get('title', system)} | {lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | "
            f"{lat['p99.9']:.2f} | {lat['max']:.2f} | {_ratio(base_p99, lat['p99'])} | "
            f"{_n(_get(s, 'produce', 'records_per_s'))} | {_n(_get(s, 'consume', 'records_per_s'))} | "
            f"{_n(_get(s, 'server', 'run_cpu_s'), 1)} |"
        )
    return rows


def _preload_table(systems: dict[str, Any]) -> list[str]:
    rows = [
        "| system | log size | consume rec/s | consume MB/s | complete | peak RssAnon MB (fill / consume passes) "
        "| fill path and rate |",
        "|---|--:|--:|--:|---|--:|---|",
    ]
    for system, entry in systems.items():
        if not _ok(entry):
            continue
        s = entry["summary"]
        pre, co, srv = s.get("preload", {}), s.get("consume", {}), s.get("server", {})
        rows.append(
            f"| {entry.get('title', system)} | {pre.get('gb', 0):.2f} GB ({_n(pre.get('total_records'))} records) | "
            f"{_n(co.get('records_per_s'))} | {_n(co.get('mb_per_s'), 1)} | {'yes' if co.get('complete') else 'NO'} | "
            f"{_n(pre.get('peak_rss_anon_mb'))} / {_n(srv.get('peak_rss_anon_mb'))} | "
            f"{pre.get('path', '')}, {_n(pre.get('records_per_s'))} rec/s |"
        )
    return rows


def _targets(results: dict[str, Any], failover: dict[str, Any] | None = None,
             rebalance: dict[str, Any] | None = None,
             queue_failover: dict[str, Any] | None = None,
             queue_parallel: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """The figures issues 2, 3, 4, 5 and 16 ask for, each with what was measured."""
    rows = ["| target | measured | verdict |", "|---|---|---|"]

    def add(target: str, measured: str, ok: bool | None) -> None:
        rows.append(f"| {target} | {measured} | {'—' if ok is None else ('met' if ok else '**missed**')} |")

    m100 = results.get("max-100b", {})
    lb = _get(m100, BASE, "summary")
    lp, lc = _get(lb, "produce", "records_per_s"), _get(lb, "consume", "records_per_s")
    add("issue 2: 100 B, acks=1, ≥ 300,000 rec/s produced", f"{_n(lp)} rec/s", lp >= 300_000 if lp else None)
    c5 = _get(results, "consume-5gb", BASE, "summary")
    c5r, c5gb = _get(c5, "consume", "records_per_s"), _get(c5, "preload", "gb")
    add(
        "issue 2: ≥ 600,000 rec/s consumed from a 5 GB log",
        f"{_n(c5r)} rec/s from {c5gb or 0:.2f} GB" if c5 else "not run",
        (c5r >= 600_000 and bool(_get(c5, "consume", "complete"))) if c5r and (c5gb or 0) >= 5 else None,
    )
    kb = _get(results, "max-100kb", BASE, "summary")
    kp, kc = _get(kb, "produce", "mb_per_s"), _get(kb, "consume", "mb_per_s")
    add(
        "issue 2: 100 KB values ≥ 300 MB/s each way",
        f"produce {_n(kp, 1)} MB/s, consume {_n(kc, 1)} MB/s",
        (kp >= 300 and kc >= 300) if kp and kc else None,
    )
    lat = _get(results, "latency-10k", BASE, "summary", "latency_ms")
    add("issue 2: end-to-end p99 < 20 ms at 10,000 rec/s", f"{lat['p99']:.2f} ms" if lat else "not measured",
        lat["p99"] < 20 if lat else None)  # fmt: skip
    anon = _get(c5, "server", "peak_rss_anon_mb_all")
    add("issue 2: broker RssAnon < 250 MB while 5 GB pass through",
        f"{anon:,.0f} MB (over {c5gb or 0:.2f} GB)" if anon else "not measured",
        anon < 250 if anon and (c5gb or 0) >= 5 else None)  # fmt: skip

    cl = _get(results, CLUSTER, BASE, "summary")
    clp = _get(cl, "produce", "records_per_s")
    add("issue 3: 3 brokers, RF 3, acks=all, 100 B: ≥ 100,000 rec/s", f"{_n(clp)} rec/s" if clp else "not run",
        clp >= 100_000 if clp else None)  # fmt: skip
    fo = _get(failover, "summary")
    kill, term = _get(fo, "kill"), _get(fo, "term")
    add("issue 3: kill -9 of a leader → first acknowledged write, median < 8 s",
        f"{kill['first_ack_s_median']:.2f} s ({kill['trials']} trials)" if kill else "not measured",
        kill["first_ack_s_median"] < kill["target_s"] if kill else None)  # fmt: skip
    add("issue 3: SIGTERM (controlled shutdown) of a leader → writes acknowledged again, median < 1 s",
        f"longest gap between acks {term['outage_s_median']:.3f} s; first ack {term['first_ack_s_median']:.3f} s "
        f"({term['trials']} trials)" if term else "not measured",
        term["outage_s_median"] < term["target_s"] if term else None)  # fmt: skip

    group_rate = _get(results, GROUP, BASE, "summary", "consume", "records_per_s")
    solo_rev = _get(m100, BASE, "revision")
    other_code = "" if solo_rev and solo_rev == _get(results, GROUP, BASE, "revision") else (
        f" (not the same code: max-100b at {solo_rev or 'an unrecorded revision'}, "
        f"{_get(m100, BASE, 'date') or '?'})")  # fmt: skip
    add("issue 4: 12 partitions, a group of 3 consumers: consume ≥ one consumer's rate (max-100b; issue 2's floor "
        "600,000 rec/s)",
        f"{_n(group_rate)} vs {_n(lc)} rec/s = {_ratio(group_rate, lc)}{other_code}" if group_rate and lc else "not run",
        group_rate >= lc and bool(_get(results, GROUP, BASE, "summary", "consume", "complete"))
        if group_rate and lc else None)  # fmt: skip
    rb = _get(rebalance, "summary")
    join, kill = _get(rb, "join"), _get(rb, "kill")
    session_s = (_get(rebalance, "setup", "session_timeout_ms") or 0) / 1000
    add("issue 4: a member joins → the group consumes again (all partitions, balanced), median < 1 s",
        f"{join['settled_s']['median']:.3f} s (max {join['settled_s']['max']:.3f} s, {join['events']} joins); the new "
        f"member's first record {join['first_record_s']['median']:.3f} s" if join else "not measured",
        join["settled_s"]["median"] < 1.0 if join else None)  # fmt: skip
    add(f"issue 4: kill -9 of a member → its partitions consumed again, median < 2 s after the session timeout "
        f"({session_s:g} s)",
        f"session timeout {kill['resumed_minus_session_s']['median']:+.3f} s (raw {kill['resumed_s']['median']:.3f} s, "
        f"max {kill['resumed_s']['max']:.3f} s, {kill['events']} kills; the eviction counts from the last heartbeat, "
        f"up to 0.5 s before the kill; eviction → consumed again {_s(kill.get('after_eviction_s'))} s, max "
        f"{_s(kill.get('after_eviction_s'), 'max')} s)" if kill else "not measured",
        kill["resumed_minus_session_s"]["median"] < 2.0 if kill else None)  # fmt: skip

    def best_peer(side: str, wl: dict[str, Any]) -> tuple[str, float]:
        vals = [(s, _get(wl, s, "summary", side, "records_per_s") or 0.0) for s in PEERS_PY]
        return max(vals, key=lambda v: v[1])

    for side, rate in (("produce", lp), ("consume", lc)):
        peer, peer_rate = best_peer(side, m100)
        add(
            f"issue 5: max-100b {side} ≥ 5× the better Python-driven peer",
            f"{_n(rate)} vs {peer} {_n(peer_rate)} = {_ratio(rate, peer_rate)}"
            if rate and peer_rate
            else "not run",
            rate / peer_rate >= 5 if rate and peer_rate else None,
        )
    native = _get(m100, "redis-native", "summary", "produce", "records_per_s")
    add("issue 5: max-100b produce ≥ 1.5× redis-benchmark XADD",
        f"{_n(lp)} vs {_n(native)} = {_ratio(lp, native)}" if lp and native else "not run",
        lp / native >= 1.5 if lp and native else None)  # fmt: skip
    l10 = results.get("latency-10k", {})
    peers = [(s, _get(l10, s, "summary", "latency_ms", "p99")) for s in PEERS_PY]
    peers = [(s, v) for s, v in peers if v]
    if lat and peers:
        peer, p99 = min(peers, key=lambda v: v[1])
        add("issue 5: latency-10k p99 ≤ 1× the better Python-driven peer",
            f"{lat['p99']:.2f} ms vs {peer} {p99:.2f} ms = {lat['p99'] / p99:.2f}×", lat["p99"] <= p99)  # fmt: skip
    rows += _queue_targets(results, queue_failover, queue_parallel)[2:]
    if lb:
        spread = max(lb["produce"]["spread"], lb["consume"]["spread"])
        add("issue 5: max-100b runs agree within 15 %", f"{lb['runs']} runs, widest spread {spread * 100:.0f} %",
            spread <= 0.15 if lb["runs"] >= 3 else None)  # fmt: skip
    return rows


def _queue_targets(results: dict[str, Any], queue_failover: dict[str, Any] | None,
                   queue_parallel: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """Issue 16's rows (a header, then a row per figure), each once its measurement was run."""
    rows = ["| target | measured | verdict |", "|---|---|---|"]
    qa = results.get("queue-ack", {})
    if qa:
        rate = _get(qa, BASE, "summary", "consume", "records_per_s")
        peers = [(s, _get(qa, s, "summary", "consume", "records_per_s") or 0.0) for s in ("rabbitmq", "nats")]
        peer, peer_rate = max(peers, key=lambda v: v[1])
        measured = (f"{_n(rate)} vs {peer} {_n(peer_rate)} acks/s = {_ratio(rate, peer_rate)}" if rate and peer_rate
                    else f"logbroker {_n(rate)}, {peer} {_n(peer_rate)} acks/s")  # fmt: skip
        ok = rate / peer_rate >= 3 and bool(_get(qa, BASE, "summary", "consume", "complete")) if rate and peer_rate else None
        rows.append(f"| issue 16: queue-ack, 4 consumers, one ack per message: ≥ 3× the better of RabbitMQ and "
                    f"NATS JetStream | {measured} | {'—' if ok is None else ('met' if ok else '**missed**')} |")  # fmt: skip
    qs = _get(queue_failover, "summary")
    if qs and qs.get("after_lock_s_median") is not None:
        ok = qs["after_lock_s_median"] < qs["target_after_lock_s"] and not queue_failover.get("problems")  # type: ignore[union-attr]
        rows.append(f"| issue 16: kill -9 of a share consumer → its unacked records delivered to another, lock expiry "
                    f"+ < 1 s | lock_ms + {qs['after_lock_s_median']:.3f} s (max {qs['after_lock_s_max']:.3f} s, "
                    f"{qs['complete_trials']} trials{_after_expiry(qs)}) | {'met' if ok else '**missed**'} |")  # fmt: skip
    qp = _get(queue_parallel, "summary")
    if qp and qp.get("ratio") is not None:
        rates = qp["records_per_s_median"]
        ok = qp["ratio"] >= qp["target_ratio"] and not queue_parallel.get("problems")  # type: ignore[union-attr]
        rows.append(f"| issue 16: a 10 ms handler, a topic of 2 partitions: 4 share consumers ≥ 3× one | "
                    f"{_n(rates['4'])} vs {_n(rates['1'])} rec/s = {qp['ratio']:.2f}× | {'met' if ok else '**missed**'} |")  # fmt: skip
    return rows


def _after_expiry(qs: dict[str, Any]) -> str:
    x = qs.get("after_expiry_s_median")
    return "" if x is None else f"; {x:.3f} s after the locks ran out"


def _failover_section(fo: dict[str, Any], latest_date: str | None) -> list[str]:
    out = ["## failover", ""]
    setup = fo.get("setup", {})
    if setup:
        out += [
            f"{setup['brokers']} brokers + ZooKeeper (session timeout {setup['zk_session_timeout_ms'] / 1000:g} s), a topic of "
            f"{setup['partitions']} partitions, RF {setup['replication_factor']}, min_insync_replicas "
            f"{setup['min_insync_replicas']}; one producer (acks={setup['acks']}, linger_ms {setup['linger_ms']}, client "
            f"defaults otherwise) writes {setup['rate_records_per_s']:,} records/s of {setup['record_size']} B to partition "
            "0 throughout. Each trial signals partition 0's leader (`kill` = SIGKILL, `term` = SIGTERM, a controlled "
            "shutdown), then restarts it and waits for every replica to be in sync and the preferred leaders back. "
            "*First ack*: signal → first acknowledgement of a record sent after the signal (producer callbacks). "
            "*Longest gap*: the longest interval without any acknowledgement around the signal — what a writer sees "
            "as the outage. *Leader elected*: signal → DescribeTopics (polled every 50 ms) names another leader. "
            "*Leader back*: after the restart the controller hands the broker its preferred leadership back as soon "
            "as it is in sync; the longest interval without an acknowledgement from the restart until 1 s after "
            "writes to it are acknowledged (a rolling restart's second outage).",
            "",
        ]
    if fo.get("date") and fo.get("date") != latest_date:
        out += [f"Measured {fo['date']} by `{fo.get('command', '?')}` (merged into this report).", ""]
    if "error" in fo:
        lines = fo["error"].strip().splitlines()
        return [*out, f"Failed: {lines[0][:400]} (full text in the run's JSON)", ""]
    summary = fo.get("summary", {})
    out += [
        "| signal | trials | first ack: median | first ack: every trial, s | longest gap: median | "
        "longest gap: every trial, s | leader elected: median | leader back, longest gap: median | failed sends "
        "| target |",
        "|---|--:|--:|---|--:|---|--:|--:|--:|---|",
    ]
    for kind, s in summary.items():
        outages = ", ".join(f"{x:.3f}" for x in s["outage_s"])
        firsts = ", ".join(f"{x:.3f}" for x in s["first_ack_s"])
        elected = s.get("leader_elected_s_median")
        out.append(
            f"| {'kill -9' if kind == 'kill' else 'SIGTERM'} | {s['trials']} | {s['first_ack_s_median']:.3f} s | {firsts} | "
            f"{s['outage_s_median']:.3f} s | {outages} | {'—' if elected is None else f'{elected:.3f} s'} | "
            f"{_n(s.get('back_outage_s_median'), 3)} s | {s['failed_sends']} | < {s['target_s']:g} s |"
        )
    kill = summary.get("kill")
    if kill and kill.get("leader_elected_s_median") is not None:
        el, fa = kill["leader_elected_s_median"], kill["first_ack_s_median"]
        out += [
            "",
            f"Reading kill -9: the controller names a new leader after {el:.2f} s (the dead broker's ZooKeeper "
            f"session has to expire); the producer's first acknowledged write follows {fa - el:.2f} s later "
            "(its retry backoff, 100 ms doubling up to 1 s, and a metadata refresh).",
        ]
    v = fo.get("verified")
    if v:
        out += [
            "",
            f"Afterwards {v['acknowledged']:,} acknowledged records were read back from partition 0: {v['missing']} missing, "
            f"{v['mismatched']} at another offset than acknowledged, {v.get('duplicated_records', 0)} written twice "
            "(a retried batch; the producer is not idempotent).",
        ]
    trials = fo.get("trials", [])
    if trials:
        out += ["", "<details><summary>every trial</summary>", "",
                "| # | signal | leader (controller?) → new leader | first ack s | longest gap s | last ack before "
                "the signal s | leader elected s | broker exited s | failed sends | leader back: longest gap s |",
                "|--:|---|---|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        for i, t in enumerate(trials, 1):
            ctl = " (controller)" if t["leader_was_controller"] else ""
            out.append(
                f"| {i} | {t['signal']} | {t['leader']}{ctl} → {t['new_leader']} | {t['first_ack_s']:.3f} | "
                f"{t['outage_s']:.3f} | {_n(t.get('last_ack_before_s'), 3)} | {_n(t['leader_elected_s'], 3)} | "
                f"{_n(t['broker_exit_s'], 3)} | {t['failed_sends']} | {_n(t.get('back_outage_s'), 3)} |"
            )
        out += ["", "</details>"]
    return [*out, ""]


def _group_notes(results: dict[str, Any], shown: dict[str, Any]) -> list[str]:
    out = [
        "The consumers join before anything is produced and the run goes on once the group has shared out the 12 "
        "partitions (logbroker: the members' own assignments, disjoint, complete and balanced); they then stop "
        "polling while the producer writes, and drain the backlog together: the rate of a settled group. How long "
        "joins and departures take is the *rebalance* section's measurement. logbroker: 3 `Consumer(..., "
        "group=\"bench\")` processes, sticky assignor, auto-commit every 5 s; Redis: one consumer group over the "
        "12 streams, `XREADGROUP` by 3 consumers (NATS is left out for time: see bench/README.md, *Groups*).",
        "",
    ]
    g = _get(shown, BASE, "summary", "group")
    solo = _get(results, "max-100b", BASE, "summary", "consume", "records_per_s")
    rate = _get(shown, BASE, "summary", "consume", "records_per_s")
    if g:
        per = g.get("records_per_consumer") or []
        out += [
            f"logbroker's group: partitions per member {'/'.join(str(n) for n in g['partitions_per_member'])}, "
            f"settled {g['settle_s']:.2f} s after the members started polling (median)"
            + (f"; records per member in run 1: {', '.join(f'{n:,}' for n in per)}" if per else "") + ".",
            "",
        ]
    if solo and rate:
        solo_entry, group_entry = _get(results, "max-100b", BASE) or {}, shown.get(BASE) or {}
        same = solo_entry.get("revision") and solo_entry.get("revision") == group_entry.get("revision")
        caveat = "" if same else (
            f" Not the same code: `max-100b` was measured {solo_entry.get('date', '?')} at "
            f"{solo_entry.get('revision') or 'an unrecorded revision'}, the group {group_entry.get('date', '?')} at "
            f"{group_entry.get('revision') or 'an unrecorded revision'}.")  # fmt: skip
        out += [
            f"Side by side: one consumer of one partition (`max-100b`) reads {solo:,.0f} rec/s; the group of 3 over "
            f"12 partitions reads {rate:,.0f} rec/s ({rate / solo * 100:.0f} %). Not the same log: keys spread the "
            f"producer's records over 12 partitions, so each batch holds about a twelfth of `max-100b`'s, and the "
            f"consumer pays a cost per batch (CRC call, header, fetch bookkeeping) besides the one per record; on 2 "
            f"cores the 3 consumer processes and the broker also share the CPU.{caveat}",
            "",
        ]
    return out


def _s(stats: dict[str, Any] | None, key: str = "median") -> str:
    v = None if stats is None else stats.get(key)
    return "—" if v is None else f"{v:.3f}"


def _signed(stats: dict[str, Any] | None, key: str = "median") -> str:
    v = None if stats is None else stats.get(key)
    return "—" if v is None else f"{v:+.3f} s"


def _rebalance_section(rb: dict[str, Any], latest_date: str | None) -> list[str]:
    out = ["## rebalance (consumer group)", ""]
    setup = rb.get("setup", {})
    if setup:
        servers = (f"{setup['brokers']} brokers + ZooKeeper, the topic at replication factor {setup['replication_factor']}"
                   if setup["brokers"] > 1 else "one standalone broker")  # fmt: skip
        out += [
            f"{servers}; a topic of {setup['partitions']} partitions written at {setup['rate_records_per_s']:,} records/s "
            f"of {setup['record_size']} B round-robin (acks={setup['acks']}, linger_ms {setup['linger_ms']}); "
            f"{setup['members']} member processes in one group, each `Consumer(..., group=..., session_timeout_ms="
            f"{setup['session_timeout_ms']}, auto_commit_interval_ms={setup['auto_commit_interval_ms']})`, assignor "
            f"{setup['assignor']}, heartbeat interval {setup['heartbeat_interval_ms']}. Each trial: a 4th member "
            "joins, the oldest calls `close()`, another joins, the oldest is killed (-9); each event starts from a "
            f"steady group after a random {'–'.join(f'{x:g}' for x in setup.get('event_delay_s', [0.5, 1.5]))} s (the "
            "members heartbeat in step after a rebalance: a fixed delay would meet the same heartbeat phase each "
            "time). Times are `time.monotonic()` in the member processes, from: the "
            "new member's Consumer constructor (join), the `close()` call (leave), the `kill` (kill).",
            "",
            "*Group consuming again*: every partition owned by one live member, balanced (3/3/3/3 or 4/4/4), and each "
            "has had a record received by its owner since time zero and since it got the partition. *Moved partitions "
            "consumed again*: the same over the partitions that changed owner (a departure: the leaver's). *Longest "
            "gap*: per moved partition, old owner's last record → new owner's first. *Coordinator* columns come from "
            "DescribeGroup polled every 50 ms.",
            "",
        ]
    if rb.get("date") and rb.get("date") != latest_date:
        rev = _get(rb, "machine", "revision")
        out += [f"Measured {rb['date']} by `{rb.get('command', '?')}`{f' at {rev}' if rev else ''}, load average "
                f"{_get(rb, 'machine', 'loadavg_1m_at_start')} at the start (merged into this report).", ""]  # fmt: skip
    if "error" in rb:
        lines = rb["error"].strip().splitlines()
        return [*out, f"Failed: {lines[0][:400]} (full text in the run's JSON)", ""]
    s = rb.get("summary", {})
    out += [
        "| event | n | group consuming again: median / max s | moved partitions consumed again: median / max s | "
        "longest gap: median / max s | what happened in between (medians, s from time zero) | records redelivered |",
        "|---|--:|--:|--:|--:|---|--:|",
    ]
    j, lv, k = s.get("join"), s.get("leave"), s.get("kill")
    if j:
        out.append(
            f"| join | {j['events']} | {_s(j['settled_s'])} / {_s(j['settled_s'], 'max')} | {_s(j['resumed_s'])} / "
            f"{_s(j['resumed_s'], 'max')} | {_s(j['longest_gap_s'])} / {_s(j['longest_gap_s'], 'max')} | coordinator "
            f"lists the member {_s(j.get('registered_s'))}; old owners' on_revoke (last) {_s(j.get('revoked_s'))}; new "
            f"member's first on_assign {_s(j.get('member_assigned_s'))}, first record {_s(j.get('first_record_s'))} "
            f"(max {_s(j.get('first_record_s'), 'max')}) | {j['redelivered']} |"
        )
    if lv:
        out.append(
            f"| close() | {lv['events']} | {_s(lv['settled_s'])} / {_s(lv['settled_s'], 'max')} | {_s(lv['resumed_s'])} / "
            f"{_s(lv['resumed_s'], 'max')} | {_s(lv['longest_gap_s'])} / {_s(lv['longest_gap_s'], 'max')} | close() "
            f"returns {_s(lv.get('close_s'))}; coordinator drops the member {_s(lv.get('left_s'))}; survivors' "
            f"on_assign (last) {_s(lv.get('assigned_s'))} | {lv['redelivered']} |"
        )
    if k:
        out.append(
            f"| kill -9 | {k['events']} | {_s(k['settled_s'])} / {_s(k['settled_s'], 'max')} | {_s(k['resumed_s'])} / "
            f"{_s(k['resumed_s'], 'max')} (session timeout {_signed(k['resumed_minus_session_s'])} / "
            f"{_signed(k['resumed_minus_session_s'], 'max')}) | {_s(k['longest_gap_s'])} / {_s(k['longest_gap_s'], 'max')} | "
            f"coordinator evicts {_s(k.get('evicted_s'))}; survivors' on_assign (last) {_s(k.get('assigned_s'))}; "
            f"eviction → consumed again {_s(k.get('after_eviction_s'))} (max {_s(k.get('after_eviction_s'), 'max')}) "
            f"| {k['redelivered']} |"
        )
    if j and j.get("registered_s"):
        out += [
            "",
            f"Reading a join: the coordinator lists the new member after {_s(j['registered_s'])} s; the old owners hear "
            "of the new target assignment at their next heartbeat (every 500 ms while the group is stable) and each "
            f"gives up a partition (on_revoke, a synchronous commit, then a heartbeat at once): the last at "
            f"{_s(j['revoked_s'])} s (max {_s(j['revoked_s'], 'max')}). The new member takes each partition as it is "
            "released (it heartbeats every 100 ms while the group reconciles): its first record at "
            f"{_s(j['first_record_s'])} s, all {setup.get('partitions', '?')} partitions consumed by their owners at "
            f"{_s(j['settled_s'])} s. The stable heartbeat interval is most of it.",
        ]
    if k and k.get("evicted_s"):
        out += [
            "",
            "Reading kill -9: the coordinator evicts the dead member a session timeout after its *last heartbeat*, "
            "which came up to one heartbeat interval (500 ms) before the kill (so a kill can be noticed sooner than "
            f"the session timeout): evicted {_s(k['evicted_s'])} s after the kill (median; {_s(k['evicted_s'], 'max')} "
            "max). The "
            "survivors hear of it at their next heartbeat — they heartbeat in step, so either at once or up to 500 ms "
            f"later — and take its partitions: eviction → consumed again {_s(k['after_eviction_s'])} s (median; max "
            f"{_s(k['after_eviction_s'], 'max')}). Redelivered records are what the dead member read after its last "
            f"auto-commit (every {setup.get('auto_commit_interval_ms', '?')} ms).",
        ]
    overlaps = rb.get("ownership_overlaps")
    if overlaps is not None:
        out += ["", f"Partitions owned by two members at once (callback times): {len(overlaps)}"
                + (f" — {'; '.join(overlaps[:5])}" if overlaps else ".")]  # fmt: skip
    events = rb.get("events", [])
    if events:
        out += ["", "<details><summary>every event</summary>", "",
                "| trial | event | member | consuming again s | moved consumed again s | longest gap s | first record / "
                "evicted s | moved | now | redelivered |",
                "|--:|---|---|--:|--:|--:|--:|--:|---|--:|"]  # fmt: skip
        for e in events:
            mid = e.get("first_record_s") if e["event"] == "join" else e.get("evicted_s")
            out.append(
                f"| {e['trial']} | {e['event']} | {e['member']} | {e['settled_s']:.3f} | {_n(e.get('resumed_s'), 3)} | "
                f"{_n(e.get('longest_gap_s'), 3)} | {_n(mid, 3)} | {e['moved']} | {e['sizes']} | "
                f"{e.get('redelivered', 0)} |"
            )
        out += ["", "</details>"]
    return [*out, ""]


def _plots(results: dict[str, Any], limits: dict[str, Any] | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    PLOTS_DIR.mkdir(exist_ok=True)
    written: list[str] = []
    panels = [(w, results[w]) for w in ("max-100b", "max-100kb", CLUSTER) if w in results]
    panels = [(w, s) for w, s in panels if any(_ok(e) for e in s.values())]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
        for ax, (wl, systems) in zip(axes[0], panels, strict=True):
            unit_mb = wl == "max-100kb"
            key = "mb_per_s" if unit_mb else "records_per_s"
            names = [s for s, e in systems.items() if _ok(e)]
            for j, side in enumerate(("produce", "consume")):
                vals = [_get(systems[s], "summary", side, key) or 0.0 for s in names]
                xs = [i + (j - 0.5) * 0.38 for i in range(len(names))]
                bars = ax.bar(xs, vals, 0.38, label=side, color=["#4c72b0", "#55a868"][j])
                for b, v in zip(bars, vals, strict=True):
                    if v:
                        label = f"{v:,.0f}" if unit_mb else f"{v / 1000:,.0f}k"
                        ax.annotate(
                            label, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7
                        )
            if unit_mb and limits:
                ax.axhline(limits["disk_write_fdatasync_mb_s"], ls="--", color="grey", lw=1)
                ax.text(len(names) - 0.5, limits["disk_write_fdatasync_mb_s"], " disk fdatasync write",
                        va="bottom", ha="right", fontsize=7, color="grey")  # fmt: skip
            ax.set_xticks(
                range(len(names)), [systems[s].get("title", s) for s in names], fontsize=8, rotation=10
            )
            if len(names) == 1:
                ax.set_xlim(-1.5, 1.5)  # one system: bars as wide as in the other panels
            ax.set_ylabel("MB/s (record values)" if unit_mb else "records/s")
            if not unit_mb:
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:,.0f}k"))
            what = "3 brokers, RF 3, acks=all, 100 B" if wl == CLUSTER else ("100 KB" if unit_mb else "100 B")
            ax.set_title(f"{wl}: {what} records, median of runs", fontsize=10)
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(PLOTS_DIR / "throughput.png", dpi=110)
        plt.close(fig)
        written.append("throughput.png")

    for name, systems in results.items():
        curves = {s: _get(e, "summary", "latency_curve_ms") for s, e in systems.items()}
        curves = {s: c for s, c in curves.items() if c}
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.6))
        for system, curve in curves.items():
            pts = [(p, v) for p, v in curve if 0 < p < 100]
            xs = [-math.log10(1 - p / 100) for p, _ in pts]
            ax.plot(xs, [max(v, 1e-3) for _, v in pts], marker="o", ms=3,
                    label=systems[system].get("title", system), color=COLORS.get(system))  # fmt: skip
            ax.plot([5], [max(curve[-1][1], 1e-3)], marker="^", color=COLORS.get(system))
        ticks = [50, 90, 99, 99.9, 99.99]
        ax.set_xticks([-math.log10(1 - t / 100) for t in ticks] + [5], [f"{t:g}%" for t in ticks] + ["max"])
        ax.set_yscale("log")
        ax.set_ylabel("end-to-end latency, ms (log)")
        ax.set_xlabel("percentile")
        ax.set_title(f"{name}: latency percentiles (all runs merged)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(PLOTS_DIR / f"latency-{name}.png", dpi=110)
        plt.close(fig)
        written.append(f"latency-{name}.png")
    return written


def _merge_skips(lines: list[str]) -> list[str]:
    """'- wl: reason (a)', '- wl: reason (b)' -> '- wl: reason (a, b)'."""
    merged: dict[str, list[str]] = {}
    for line in lines:
        head, _, system = line.rpartition(" (")
        merged.setdefault(head, []).append(system.rstrip(")"))
    return [f"{head} ({', '.join(systems)})" for head, systems in merged.items()]


def render(latest: dict[str, Any], plots: list[str]) -> str:
    m = latest.get("machine", {})
    limits = latest.get("limits")
    results: dict[str, Any] = _ordered(latest.get("results", {}))
    versions = sorted(
        {e.get("version", "") for s in results.values() for e in s.values() if e.get("version")}
    )
    runs = sorted({_get(e, "summary", "runs") for s in results.values() for e in s.values() if _ok(e)})
    out = [
        "# logbroker benchmark results",
        "",
        "Written by `python -m bench report` from `bench/results/latest.json`; how to reproduce: `bench/README.md`.",
        "",
        f"- Command: `{latest.get('command', '?')}` (wall time {latest.get('wall_s', 0):.0f} s)",
        f"- Date: {latest.get('date', '?')}",
        f"- Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gib', '?')} GiB RAM, "
        f"{m.get('os', '')}, kernel {m.get('kernel', '')}, Python {m.get('python', '')}; "
        f"load average {m.get('loadavg_1m_at_start', '?')} at the start, {m.get('loadavg_1m_at_end', '?')} at the end",
        f"- Versions: {', '.join(versions)}" + (f"; source {m['revision']}" if m.get("revision") else ""),
        f"- Each figure is the median of {', '.join(str(r) for r in runs) or '?'} runs; rates count only what happened "
        "after the warm-up; MB = 10⁶ bytes of record values; all on 127.0.0.1, every process on the same 2 cores.",
        "- `logbroker ÷ system` above 1 means logbroker is faster; `logbroker p99 ÷ system p99` below 1 means "
        "logbroker's latency is lower.",
        "- Server memory: peak RSS includes the page cache a process has mapped (logbroker's mmap'd segments); "
        "RssAnon is the process's own memory (heap, buffers) — for Redis, its whole dataset.",
        "",
    ]
    if limits:
        out += [
            "## Machine limits",
            "",
            "| limit | median | runs |",
            "|---|--:|---|",
            f"| sequential write, 1 GiB in 1 MiB chunks + fdatasync ({limits['data_root']}) | "
            f"{limits['disk_write_fdatasync_mb_s']:,.0f} MB/s | {', '.join(f'{x:,.0f}' for x in limits['disk_runs_mb_s'])} |",
            f"| loopback TCP, 1 MiB sends, two processes | {limits['loopback_tcp_mb_s']:,.0f} MB/s | "
            f"{', '.join(f'{x:,.0f}' for x in limits['loopback_runs_mb_s'])} |",
            "",
        ]
    failover = latest.get("failover")
    rebalance = latest.get("rebalance")
    targets = _targets(results, failover, rebalance, latest.get("queue-failover"), latest.get("queue-parallel"))
    queues = results.get("queue-ack") or latest.get("queue-failover") or latest.get("queue-parallel")
    issues = "2, 3, 4, 5 and 16" if queues else "2, 3, 4 and 5"
    out += [f"## Targets from issues {issues}", "", *targets, ""]
    skipped: list[str] = []
    failed: list[str] = []
    problems: list[str] = []
    for wl, systems in results.items():
        shown = {s: e for s, e in systems.items() if _ok(e)}
        for s, e in systems.items():
            if "skipped" in e:
                skipped.append(f"- {wl}: {e['skipped']} ({s})")
            if "error" in e:
                lines = e["error"].strip().splitlines()
                why = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
                failed.append(f"- {wl} on {s}: {why[:400]} (full text in the run's JSON)")
            problems += [f"- {wl} on {s}: {p}" for p in _get(e, "summary", "problems") or []]
        if not shown:
            continue
        desc = next((_get(e, "workload", "description") for e in shown.values()), None) or ""
        out += [f"## {wl}", ""]
        if desc:
            out += [desc, ""]
        other_runs = sorted(
            {
                (e["date"], e["command"], e.get("revision") or "", tuple(e.get("load_average") or ()))
                for e in shown.values()
                if e.get("date", latest.get("date")) != latest.get("date")
            }
        )
        out += [
            f"Measured {d} by `{c}`{f' at {rev}' if rev else ''}"
            f"{f', load average {load[0]} at the start, {load[1]} at the end' if len(load) == 2 else ''} "
            "(merged into this report)."
            for d, c, rev, load in other_runs
        ] + [""] * bool(other_runs)
        if wl == CLUSTER:
            out += [
                "Server CPU and memory are the three brokers' together (ZooKeeper not included); the consumer reads "
                "all partitions from their leaders.",
                "",
            ]
            solo = _get(results, "max-100b", BASE, "summary", "produce", "records_per_s")
            rf3 = _get(shown, BASE, "summary", "produce", "records_per_s")
            if solo and rf3:
                out += [
                    f"Side by side: one standalone broker, 1 partition, acks=1 (`max-100b`) produces {solo:,.0f} rec/s; "
                    f"three brokers replicating every record 3 times with acks=all produce {rf3:,.0f} rec/s "
                    f"({rf3 / solo * 100:.0f} %).",
                    "",
                ]
        if wl == GROUP:
            out += _group_notes(results, shown)
        if any(_get(e, "summary", "latency_ms") for e in shown.values()):
            out += _latency_table(shown)
        elif any(_get(e, "summary", "preload") for e in shown.values()):
            out += _preload_table(shown)
        else:
            out += _throughput_table(wl, shown, limits if wl == "max-100kb" else None)
        out.append("")
    if failover:
        out += _failover_section(failover, latest.get("date"))
    if rebalance:
        out += _rebalance_section(rebalance, latest.get("date"))
    skipped = _merge_skips(skipped)
    for title, items in (("Failed", failed), ("Problems noticed", problems), ("Skipped", skipped)):
        if items:
            out += [f"## {title}", "", *items, ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}](plots/{p})" for p in plots] + [""]
    return "\n".join(out) + "\n"


# Everything from this heading on in RESULTS.md is hand-kept (before/after comparisons of one
# issue, measured outside `bench run --all`): `write` carries it over to the regenerated file.
KEPT_HEADING = "## Comparisons (kept across reports)"


def kept_sections(previous: str) -> str:
    """The hand-kept tail of a previous RESULTS.md (from KEPT_HEADING on), or ''."""
    at = previous.find("\n" + KEPT_HEADING)
    return previous[at + 1:] if at >= 0 else ""


def write(results_dir: Path) -> None:
    latest_path = results_dir / "latest.json"
    if not latest_path.exists():
        say(f"bench report: no {latest_path}; run `python -m bench run --all` first")
        return
    latest = json.loads(latest_path.read_text())
    plots = _plots(_ordered(latest.get("results", {})), latest.get("limits"))
    kept = kept_sections(RESULTS_MD.read_text()) if RESULTS_MD.exists() else ""
    RESULTS_MD.write_text(render(latest, plots) + ("\n" + kept if kept else ""))
    say(f"bench report: wrote {RESULTS_MD} and {len(plots)} plot(s) in {PLOTS_DIR}")

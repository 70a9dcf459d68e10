"""The load balancer's plan (pure): which partitions to move so leadership and load even out.

Input: the brokers (id, rack, alive) and the partitions (replicas, leader, ISR, min ISR, and what is
known of their load: bytes in and out per second, size on disk). Output: a `Plan`, a bounded list of
`Move`s, each one partition given a new replica list (applied as a reassignment), with its expected
effect per broker. No I/O, no clock: the same input gives the same plan.

Two kinds of moves:

    leader     the same replica set, reordered so that another in-sync replica comes first (the
               preferred leader); the controller then elects it (a reassignment to the same set
               copies nothing: every target replica is already in the ISR). Chosen to even out, per
               live broker, the number of partitions it leads and the bytes its leaderships carry
               (bytes in + bytes out per second).
    replicas   (`Options.move_replicas`) one replica moves to a broker that holds none of the
               partition, in the same position of the list (a moved preferred leader is replaced as
               preferred leader; once the reassignment finishes the controller elects the first
               replica, so the plan counts it as the leader). Chosen to even out replicas and bytes on disk per live broker. The
               reassignment copies first: the new replica joins the ISR before the old one leaves.

Safety rules, for every move:

- only partitions with a live leader and at least `min_insync_replicas` in their ISR are touched;
- a new preferred leader is live and in the ISR;
- a replica move keeps every other replica of the target in the ISR (so the reassignment can
  finish), never lowers the number of distinct racks the replicas span (a broker without a rack
  counts as its own rack), and keeps the replication factor (so the ISR after the move, which holds
  every target replica, is at least min ISR);
- a partition moves at most once per plan (a replica move whose target's first replica is then
  chosen for leadership is still one move); at most `Options.max_moves` moves (when replicas move,
  at most half of them are replica moves, the rest leadership).

The choice is greedy: each step takes the move that lowers the imbalance cost most (ties broken by
topic, partition, broker id), and stops when no move lowers it. Leader counts can be stuck where no
single move helps (broker A leads 2, C leads 0, but no partition A leads has a replica on C): then a
chain of moves A -> B -> C (an augmenting path, shortest first) is taken if it lowers the cost. The cost is the sum over live
brokers of the squared relative deviation from the mean, for each balanced figure whose mean is > 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_MOVES_DEFAULT = 50
MAX_MOVES_LIMIT = 1000
_EPSILON = 1e-9


@dataclass(frozen=True)
class BrokerInfo:
    broker_id: int
    rack: str = ""
    alive: bool = True


@dataclass(frozen=True)
class PartitionLoad:
    topic: str
    partition: int
    replicas: tuple[int, ...]
    leader: int
    isr: tuple[int, ...]
    min_insync_replicas: int = 1
    bytes_in_per_sec: float = 0.0
    bytes_out_per_sec: float = 0.0
    size_bytes: int = 0

    @property
    def leader_load(self) -> float:
        return self.bytes_in_per_sec + self.bytes_out_per_sec


@dataclass(frozen=True)
class Options:
    max_moves: int = MAX_MOVES_DEFAULT
    move_replicas: bool = False


@dataclass(frozen=True)
class Move:
    topic: str
    partition: int
    kind: str  # "leader" or "replicas"
    replicas_before: tuple[int, ...]
    replicas_after: tuple[int, ...]
    leader_before: int
    leader_after: int

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "kind": self.kind,
                "replicas_before": list(self.replicas_before), "replicas_after": list(self.replicas_after),
                "leader_before": self.leader_before, "leader_after": self.leader_after}


@dataclass(frozen=True)
class BrokerLoad:
    broker_id: int
    leaders: int = 0
    leader_bytes_in_per_sec: float = 0.0
    leader_bytes_out_per_sec: float = 0.0
    replicas: int = 0
    replica_size_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"broker_id": self.broker_id, "leaders": self.leaders,
                "leader_bytes_in_per_sec": self.leader_bytes_in_per_sec,
                "leader_bytes_out_per_sec": self.leader_bytes_out_per_sec,
                "replicas": self.replicas, "replica_size_bytes": self.replica_size_bytes}


@dataclass(frozen=True)
class Plan:
    moves: tuple[Move, ...]
    before: tuple[BrokerLoad, ...]
    after: tuple[BrokerLoad, ...]
    skipped: tuple[str, ...] = field(default_factory=tuple)  # partitions left alone, with why

    def spread(self) -> dict[str, dict[str, float]]:
        """Per figure, before and after: max |value - mean| / mean over the live brokers (0: even)."""
        out: dict[str, dict[str, float]] = {}
        for name in ("leaders", "leader_bytes_in_per_sec", "replicas", "leader_bytes_out_per_sec"):
            out[name] = {"before": spread([getattr(b, name) for b in self.before]),
                         "after": spread([getattr(b, name) for b in self.after])}
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"moves": [m.as_dict() for m in self.moves], "before": [b.as_dict() for b in self.before],
                "after": [b.as_dict() for b in self.after], "spread": self.spread(),
                "skipped": list(self.skipped)}


def spread(values: Sequence[float]) -> float:
    """max |v - mean| / mean (0 for no values or a zero mean)."""
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    return 0.0 if mean <= 0 else max(abs(v - mean) for v in values) / mean


def _cost(values: dict[int, float]) -> float:
    if not values:
        return 0.0
    mean = sum(values.values()) / len(values)
    if mean <= 0:
        return 0.0
    return sum((v - mean) ** 2 for v in values.values()) / (mean * mean)


def _rack_count(replicas: Iterable[int], racks: dict[int, str]) -> int:
    return len({racks.get(b) or f"\0{b}" for b in replicas})


class _State:
    """The planned view while moves are chosen: per partition its replicas and leader, and per live
    broker the running totals (kept up to date by `apply`, so a candidate costs O(brokers))."""

    def __init__(self, live: list[int], partitions: Sequence[PartitionLoad]) -> None:
        self.by_tp = {(p.topic, p.partition): p for p in partitions}
        self.replicas = {tp: p.replicas for tp, p in self.by_tp.items()}
        self.leader = {tp: p.leader for tp, p in self.by_tp.items()}
        # per live broker: leaders, leader bytes in/s, leader bytes out/s, replicas, replica bytes
        self.acc: dict[int, list[float]] = {b: [0, 0.0, 0.0, 0, 0] for b in live}
        for tp in self.by_tp:
            self._add(tp, 1)

    def _add(self, tp: tuple[str, int], sign: int) -> None:
        p = self.by_tp[tp]
        a = self.acc.get(self.leader[tp])
        if a is not None:
            a[0] += sign
            a[1] += sign * p.bytes_in_per_sec
            a[2] += sign * p.bytes_out_per_sec
        for r in self.replicas[tp]:
            if r in self.acc:
                self.acc[r][3] += sign
                self.acc[r][4] += sign * p.size_bytes

    def apply(self, tp: tuple[str, int], replicas: tuple[int, ...], leader: int) -> None:
        self._add(tp, -1)
        self.replicas[tp], self.leader[tp] = replicas, leader
        self._add(tp, 1)

    def loads(self) -> tuple[BrokerLoad, ...]:
        return tuple(BrokerLoad(b, int(a[0]), a[1], a[2], int(a[3]), int(a[4])) for b, a in sorted(self.acc.items()))

    def leader_cost(self) -> float:
        return (_cost({b: a[0] for b, a in self.acc.items()})
                + _cost({b: a[1] + a[2] for b, a in self.acc.items()}))

    def replica_cost(self) -> float:
        return _cost({b: a[3] for b, a in self.acc.items()}) + _cost({b: a[4] for b, a in self.acc.items()})


def _movable(p: PartitionLoad, alive: set[int]) -> str | None:
    """Why `p` may not move (None: it may)."""
    if p.leader < 0 or p.leader not in alive:
        return f"{p.topic}-{p.partition}: no live leader"
    if len(p.isr) < p.min_insync_replicas:
        return f"{p.topic}-{p.partition}: ISR {list(p.isr)} below min ISR {p.min_insync_replicas}"
    return None


def _leader_candidates(replicas: tuple[int, ...], in_sync: Iterable[int], alive: set[int],
                       leader: int) -> list[tuple[int, tuple[int, ...]]]:
    out = []
    for b in sorted(set(in_sync) & set(replicas)):
        if b != leader and b in alive:
            out.append((b, (b, *[r for r in replicas if r != b])))
    return out


def _replica_candidates(p: PartitionLoad, alive: set[int], racks: dict[int, str]) -> list[tuple[int, tuple[int, ...]]]:
    out = []
    racks_now = _rack_count(p.replicas, racks)
    for i, a in enumerate(p.replicas):
        others = [r for r in p.replicas if r != a]
        if any(r not in p.isr or r not in alive for r in others):
            continue  # the reassignment could not finish
        for c in sorted(alive - set(p.replicas)):
            target = (*p.replicas[:i], c, *p.replicas[i + 1:])
            if _rack_count(target, racks) >= racks_now and len(target) >= p.min_insync_replicas:
                out.append((c, target))
    return out


Step = tuple[tuple[str, int], tuple[int, ...], int]  # partition, new replicas, new leader


def _candidates(state: _State, tp: tuple[str, int], kind: str, alive: set[int], racks: dict[int, str],
                retargeted: frozenset[tuple[str, int]]) -> list[tuple[int, tuple[int, ...]]]:
    p = state.by_tp[tp]
    if kind == "leader":
        replicas = state.replicas[tp]
        return _leader_candidates(replicas, replicas if tp in retargeted else p.isr, alive, state.leader[tp])
    return _replica_candidates(p, alive, racks)


def _chain(state: _State, tps: list[tuple[str, int]], alive: set[int], retargeted: frozenset[tuple[str, int]],
           budget: int) -> list[Step] | None:
    """When no single leadership move helps: a chain of them (an augmenting path) from a broker leading
    the most partitions to one leading at least two fewer, each step handing one partition to the
    next broker of the path, so only the ends change counts. Breadth first, ties by partition: the
    shortest chain, at most `budget` steps; None if there is none."""
    counts = {b: a[0] for b, a in state.acc.items()}
    by_leader: dict[int, list[tuple[str, int]]] = {}
    for tp in tps:
        by_leader.setdefault(state.leader[tp], []).append(tp)
    for src in sorted(counts, key=lambda b: (-counts[b], b)):
        prev: dict[int, tuple[int, Step] | None] = {src: None}
        frontier = [src]
        while frontier:
            nxt: list[int] = []
            for x in frontier:
                if counts[x] <= counts[src] - 2:
                    path: list[Step] = []
                    at = prev[x]
                    while at is not None:
                        path.append(at[1])
                        at = prev[at[0]]
                    return list(reversed(path)) if len(path) <= budget else None
                for tp in by_leader.get(x, []):
                    for b, target in _candidates(state, tp, "leader", alive, {}, retargeted):
                        if b not in prev:
                            prev[b] = (x, (tp, target, b))
                            nxt.append(b)
            frontier = nxt
    return None


def _best_step(state: _State, tps: list[tuple[str, int]], kind: str, alive: set[int], racks: dict[int, str],
               retargeted: frozenset[tuple[str, int]]) -> Step | None:
    """The single move that lowers the cost most (ties: the first by partition and broker), if any."""
    cost_of = state.leader_cost if kind == "leader" else state.replica_cost
    base = cost_of()
    best: tuple[float, Step] | None = None
    for tp in tps:
        replicas, leader = state.replicas[tp], state.leader[tp]
        for _b, target in _candidates(state, tp, kind, alive, racks, retargeted):
            state.apply(tp, target, target[0])  # a finished reassignment elects its preferred leader
            delta = cost_of() - base
            state.apply(tp, replicas, leader)
            if delta < -_EPSILON and (best is None or delta < best[0] - _EPSILON):
                best = (delta, (tp, target, target[0]))
    return None if best is None else best[1]


def _greedy(state: _State, tps: list[tuple[str, int]], budget: int, kind: str, alive: set[int],
            racks: dict[int, str], retargeted: frozenset[tuple[str, int]] = frozenset()) -> list[Move]:
    """Up to `budget` moves of `kind`, each the one that lowers the cost most (for leadership, when
    none does, a chain of moves that evens the leader counts, if it lowers the cost); stops when
    nothing helps. `retargeted`: partitions a replica move already gave new replicas; a leadership
    move may reorder those (every target replica is in the ISR when the reassignment finishes)."""
    moves: list[Move] = []
    moved: set[tuple[str, int]] = set()
    cost_of = state.leader_cost if kind == "leader" else state.replica_cost
    while len(moves) < budget:
        free = [tp for tp in tps if tp not in moved]
        step = _best_step(state, free, kind, alive, racks, retargeted)
        steps = [step] if step is not None else []
        if not steps and kind == "leader":
            chain = _chain(state, free, alive, retargeted, budget - len(moves)) or []
            undo = [(tp, state.replicas[tp], state.leader[tp]) for tp, _, _ in chain]
            base = cost_of()
            for tp, target, leader in chain:
                state.apply(tp, target, leader)
            if cost_of() < base - _EPSILON:
                steps = chain
            for tp, replicas, leader in reversed(undo):
                state.apply(tp, replicas, leader)
        if not steps:
            break
        for tp, target, new_leader in steps:
            p = state.by_tp[tp]
            moves.append(Move(tp[0], tp[1], kind, p.replicas, target, p.leader, new_leader))
            state.apply(tp, target, new_leader)
            moved.add(tp)
    return moves


def _merge(replica_moves: list[Move], leader_moves: list[Move]) -> list[Move]:
    """One move per partition: a leadership move of a partition whose replicas move reorders that
    replica move's target."""
    by_tp = {(m.topic, m.partition): m for m in leader_moves}
    out = [by_tp.pop((m.topic, m.partition), m) for m in replica_moves]
    out = [Move(m.topic, m.partition, "replicas", m.replicas_before, m.replicas_after, m.leader_before, m.leader_after)
           for m in out]
    return out + [m for m in leader_moves if (m.topic, m.partition) in by_tp]


def plan(brokers: Sequence[BrokerInfo], partitions: Sequence[PartitionLoad], options: Options = Options()) -> Plan:
    """The moves that even out the cluster, and their expected effect (see the module doc)."""
    if not 0 <= options.max_moves <= MAX_MOVES_LIMIT:
        raise ValueError(f"max_moves must be in [0, {MAX_MOVES_LIMIT}], got {options.max_moves}")
    alive = {b.broker_id for b in brokers if b.alive}
    racks = {b.broker_id: b.rack for b in brokers}
    ordered = sorted(partitions, key=lambda p: (p.topic, p.partition))
    state = _State(sorted(alive), ordered)
    before = state.loads()
    skipped = tuple(why for why in (_movable(p, alive) for p in ordered) if why is not None)
    tps = [(p.topic, p.partition) for p in ordered if _movable(p, alive) is None]
    replica_moves: list[Move] = []
    if options.move_replicas:
        replica_moves = _greedy(state, tps, options.max_moves // 2, "replicas", alive, racks)
    retargeted = frozenset((m.topic, m.partition) for m in replica_moves)
    leader_moves = _greedy(state, tps, options.max_moves - len(replica_moves), "leader", alive, racks, retargeted)
    moves = _merge(replica_moves, leader_moves)
    return Plan(tuple(moves), before, state.loads(), skipped)

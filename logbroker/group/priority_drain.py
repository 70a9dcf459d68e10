"""How one ShareFetch divides its records among the priority levels of a topic (pure).

Each level k > 0 of a topic is its own log (cluster/priority_levels.py), so each is its own share
partition with its own window: a backlog of any size at level 0 never hides a new record at level 9,
which enters level 9's window on the next read and is acquired first.

Strict (no `priority_weights`): a fetch takes from the highest level with records, then the next,
until `max_records`. Weighted (`priority_weights` = w0,...,w(N-1)): a deficit round robin. Every
fetch credits each level present with its share of the budget, budget * w / sum(w); the first pass
acquires from each level (highest first) up to the whole part of its credit; a second pass gives
what is left to the levels highest first (work conserving: a level without records does not waste
the fetch). What a level got is debited from its credit, so over fetches the levels get their
weights' shares even with a budget of 1 record per fetch. A level that had fewer records than it
was offered is "empty": then every credit goes back to 0 (weights govern only while the levels are
backlogged; no level builds up a debt or a hoard while another is empty). Credits stay within
+-CREDIT_BOUND.

Per-key FIFO (`ordering="key"`) holds within each level: records of one key at different
priorities are different logs, and a higher one may be handed out first.

One `LevelDrain` per (share group, user topic), kept in memory by the coordinator (lost on a
coordinator move: the weights then start afresh, which only shifts the mix of a few fetches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

CREDIT_BOUND = 1_000_000.0


@dataclass
class LevelDrain:
    weights: tuple[int, ...] = ()  # one per level, level 0 first; (): strict
    credit: dict[int, float] = field(default_factory=dict)

    def set_weights(self, weights: tuple[int, ...]) -> None:
        if weights != self.weights:
            self.weights = weights
            self.credit.clear()

    def _weight(self, level: int) -> int:
        return self.weights[level] if level < len(self.weights) else 1

    def passes(self, levels: Iterable[int], budget: int) -> list[tuple[int, int]]:
        """(level, at most this many records), in the order to acquire them (module doc)."""
        order = sorted(set(levels), reverse=True)
        if not self.weights or budget <= 0 or len(order) < 2:
            return [(lv, budget) for lv in order]
        total = sum(self._weight(lv) for lv in order)
        first: list[tuple[int, int]] = []
        for lv in order:
            c = self.credit.get(lv, 0.0) + budget * self._weight(lv) / total
            c = self.credit[lv] = max(-CREDIT_BOUND, min(CREDIT_BOUND, c))
            first.append((lv, max(0, min(budget, int(c)))))
        return first + [(lv, budget) for lv in order]

    def settle(self, got: dict[int, int], empty: Sequence[int] | set[int]) -> None:
        """What each level gave in this fetch, and which had fewer records than asked."""
        if not self.weights:
            return
        if empty:
            self.credit.clear()
            return
        for lv, n in got.items():
            self.credit[lv] = max(-CREDIT_BOUND, self.credit.get(lv, 0.0) - n)


def drain(drainer: LevelDrain, levels: Iterable[int], budget: int, take: Callable[[int, int], int]) -> dict[int, int]:
    """One fetch: `take(level, n)` acquires up to n records of a level and says how many it got;
    returns how many each level gave. The coordinator's acquire loop (share_coordinator.py)."""
    got: dict[int, int] = {}
    empty: set[int] = set()
    left = budget
    for lv, most in drainer.passes(levels, budget):
        ask = min(most, left)
        if ask <= 0:
            continue
        n = take(lv, ask)
        got[lv] = got.get(lv, 0) + n
        left -= n
        if n < ask:
            empty.add(lv)
    drainer.settle(got, empty)
    return got

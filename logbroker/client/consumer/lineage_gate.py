"""Per-key order across a topic's growth, on the consumer (cluster/lineage.py has the rule).

A partition added when its topic grew (a child) has every older partition as a parent, each with a
split offset. The consumer fetches nothing of a child until every parent has been consumed up to
its split offset, so a moved key's records in its new partition never overtake its older records
in the old one. A parent counts as consumed up to:

- its position, when this consumer holds it (records below the position were handed out by poll());
- else the group's committed offset of it (OffsetFetch to the coordinator, asked again with a capped
  exponential backoff while the child waits); a consumer without a group has no one else's progress
  to wait for, so a parent it does not hold does not hold the child back.

A cluster records a split pending first (cluster/lineage.py): its parents' offsets are SPLIT_PENDING
until the old partitions' leaders have given them, and the child is held (and the metadata re-read,
`lineage_unknown`) until they are known.

Once a child opens it stays open for as long as it stays assigned (its lineage never changes). The
gate's state lives on each `PartitionState` (`held`, `gate_checked`), which the fetcher reads.
"""

from __future__ import annotations

from collections.abc import Callable

from logbroker.client.consumer.subscription import PartitionState, SubscriptionState, TopicPartition
from logbroker.cluster.lineage import child_ready, waiting_on
from logbroker.errors import LogbrokerError
from logbroker.retry import RetryPolicy

ParentsOf = Callable[[str, int], "dict[int, int] | None"]  # None: the partition is not in the metadata yet
CommittedFetch = Callable[[list[TopicPartition], float], dict[TopicPartition, int]]

GATE_CHECK_MAX_S = 2.0  # longest wait between two OffsetFetch calls for a held child


class LineageGate:
    def __init__(self, subscription: SubscriptionState, parents_of: ParentsOf, committed: CommittedFetch | None,
                 policy: RetryPolicy, request_timeout_s: float) -> None:
        self._subs = subscription
        self._parents_of = parents_of
        self._committed_fetch = committed
        self._policy = policy
        self._request_timeout_s = request_timeout_s
        self._committed: dict[TopicPartition, int] = {}
        self._check_at = 0.0
        self._checks = 0  # OffsetFetch calls in a row that did not open every held child
        # a held child whose lineage the metadata does not know yet, or whose split is still pending
        # (a cluster reading the split offsets): the consumer re-reads metadata until it is known
        self.lineage_unknown = False

    def update(self, now: float) -> None:
        """Hold newly assigned children, and open the held ones whose parents are done."""
        held: list[tuple[PartitionState, dict[int, int]]] = []
        self.lineage_unknown = False
        for st in self._subs.assigned.values():
            if st.gate_checked and not st.held:
                continue
            parents = self._parents_of(st.topic, st.partition)
            if parents is None:  # its lineage is not known yet: held until the metadata has it
                st.held = True
                self.lineage_unknown = True
                continue
            if any(o < 0 for o in parents.values()):  # split pending (cluster/lineage.py SPLIT_PENDING)
                self.lineage_unknown = True
            st.gate_checked = True
            st.held = bool(parents)
            if st.held:
                held.append((st, parents))
        if not held:
            if not any(st.held for st in self._subs.assigned.values()):
                self._checks = 0
            return
        remote = self._open_ready(held)
        if remote and self._committed_fetch is not None and now >= self._check_at:
            self._fetch_committed(sorted(remote), now)
            self._open_ready(held)

    def _consumed(self, topic: str, parents: dict[int, int]) -> tuple[dict[int, int], set[TopicPartition]]:
        """How far each parent has been consumed; and the parents known only through the group."""
        consumed: dict[int, int] = {}
        remote: set[TopicPartition] = set()
        for p, split in parents.items():
            st = self._subs.assigned.get((topic, p))
            if st is not None:
                consumed[p] = -1 if st.position is None else st.position
            elif self._committed_fetch is None:
                consumed[p] = split  # no group: nobody else's progress to wait for
            else:
                consumed[p] = self._committed.get((topic, p), -1)
                remote.add((topic, p))
        return consumed, remote

    def _open_ready(self, held: list[tuple[PartitionState, dict[int, int]]]) -> set[TopicPartition]:
        """Open the children that may be read; the group-held parents the others wait on."""
        waiting: set[TopicPartition] = set()
        for st, parents in held:
            if not st.held:
                continue
            consumed, remote = self._consumed(st.topic, parents)
            if child_ready(parents, consumed):
                st.held = False
            else:
                waiting |= {tp for tp in remote if tp[1] in waiting_on(parents, consumed)}
        return waiting

    def _fetch_committed(self, parents: list[TopicPartition], now: float) -> None:
        assert self._committed_fetch is not None
        self._checks += 1
        delay_ms = self._policy.delay_ms(min(self._checks, 30)) or 0
        self._check_at = now + min(delay_ms / 1000, GATE_CHECK_MAX_S)
        try:
            self._committed.update(self._committed_fetch(parents, now + self._request_timeout_s))
        except LogbrokerError:
            pass  # asked again after the backoff

    def waiting(self) -> list[TopicPartition]:
        """The children held back now (for tests and logs)."""
        return sorted((st.topic, st.partition) for st in self._subs.assigned.values() if st.held)

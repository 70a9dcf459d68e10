"""Source offset -> target offset, per partition, for translating group offsets (pure).

The mirror records every acknowledged copy (source offset s written at target offset t). Copies
arrive in offset order per partition; runs where both sides advance by one are stored as one
`Run(src_start, tgt_start, length)`, so an uncompacted source takes one run per partition (plus
one per restart). At most `max_runs` runs are kept per partition (the oldest dropped): the map
answers for offsets from the oldest run on.

translate(c), c a group's committed offset on the source (the next record it would read): the
target offset of the first mirrored record at or after c.
    c inside a run          tgt_start + (c - src_start)
    c in a gap before a run that run's tgt_start (the source had no records there: compaction)
    c at or past the end    the end of the last run on the target (the records from the end to c
                            are not copied yet: a consumer failing over re-reads them, loses none)
    c before the first run  None: unknown (this mirror did not see it), no checkpoint

On a restart the mirror seeds the map from the target: when the first and last records of a target
partition carry source offsets as far apart as their own offsets, everything between is one run.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

DEFAULT_MAX_RUNS = 1024


class Run(NamedTuple):
    src_start: int
    tgt_start: int
    length: int


class OffsetMap:
    def __init__(self, max_runs: int = DEFAULT_MAX_RUNS) -> None:
        if max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {max_runs}")
        self._max_runs = max_runs
        self._runs: dict[tuple[str, int], list[Run]] = {}

    def record(self, tp: tuple[str, int], src: int, tgt: int) -> None:
        runs = self._runs.setdefault(tp, [])
        if runs:
            last = runs[-1]
            if src == last.src_start + last.length and tgt == last.tgt_start + last.length:
                runs[-1] = last._replace(length=last.length + 1)
                return
            if src < last.src_start + last.length:  # a restart below what we knew: forget the rest
                runs.clear()
        runs.append(Run(src, tgt, 1))
        if len(runs) > self._max_runs:
            del runs[0]

    def seed(self, tp: tuple[str, int], run: Run) -> None:
        """Start the partition's map with what the target already holds (a restart): one run."""
        if run.length < 1:
            raise ValueError(f"a run has at least one record, got {run}")
        self._runs[tp] = [run]

    def runs(self, tp: tuple[str, int]) -> list[Run]:
        return list(self._runs.get(tp, ()))

    def mirrored_end(self, tp: tuple[str, int]) -> int | None:
        """The source offset after the last copied record (None: nothing copied)."""
        runs = self._runs.get(tp)
        if not runs:
            return None
        return runs[-1].src_start + runs[-1].length

    def translate(self, tp: tuple[str, int], committed: int) -> int | None:
        runs = self._runs.get(tp)
        if not runs or committed < runs[0].src_start:
            return None
        i = bisect.bisect_right([r.src_start for r in runs], committed) - 1
        run = runs[i]
        if committed < run.src_start + run.length:
            return run.tgt_start + (committed - run.src_start)
        if i + 1 < len(runs):
            return runs[i + 1].tgt_start
        return run.tgt_start + run.length

    def forget(self, tp: tuple[str, int]) -> None:
        self._runs.pop(tp, None)

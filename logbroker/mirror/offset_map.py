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
        self.record_run(tp, src, tgt, 1)

    def record_run(self, tp: tuple[str, int], src: int, tgt: int, length: int) -> None:
        """Source offsets src..src+length-1 copied to target offsets tgt..tgt+length-1."""
        if length < 1:
            raise ValueError(f"a run has at least one record, got {length}")
        runs = self._runs.setdefault(tp, [])
        if runs:
            last = runs[-1]
            if src == last.src_start + last.length and tgt == last.tgt_start + last.length:
                runs[-1] = last._replace(length=last.length + length)
                return
            if src < last.src_start + last.length:  # a restart below what we knew: forget the rest
                runs.clear()
        runs.append(Run(src, tgt, length))
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


def copied_runs(first: int, gaps: list[int] | None, target_runs: list[tuple[int, int, int]]) -> list[Run]:
    """Where one sent chunk of a source partition went, as runs: the chunk's source offsets are
    `first`, first+1, ... (`gaps` None) or `gaps` (every offset, a compacted source); `target_runs`
    are (partition, first target offset, count) in order, one per target batch
    (FutureRecordsMetadata.runs()). A contiguous chunk gives one run per target batch; with gaps,
    one per stretch where both sides advance by one."""
    out: list[Run] = []
    if gaps is None:
        src = first
        for _partition, tgt, count in target_runs:
            out.append(Run(src, tgt, count))
            src += count
        return out
    at = 0
    for _partition, tgt, count in target_runs:
        for k in range(count):
            s, t = gaps[at + k], tgt + k
            last = out[-1] if out else None
            if last is not None and s == last.src_start + last.length and t == last.tgt_start + last.length:
                out[-1] = last._replace(length=last.length + 1)
            else:
                out.append(Run(s, t, 1))
        at += count
    return out

"""Compaction of live logs: one pass over one log in three phases, and `LogCleaner`, the driver
that runs passes in the background (see compaction.py for the decisions and segment_cleaner.py
for the files and the crash-safe swap).

A pass (`clean_log` runs the three in a row; the driver runs the middle one in its thread):
1. `prepare_clean`, where the log's other mutations run (the event loop): plan the clean
   (compaction.plan_clean) and take zero-copy views of the planned closed segments. A view keeps
   its mapping alive even if the segment is deleted or closed meanwhile (segment.py "Views").
2. `run_clean`, in any thread: build the offset map over the views and write each changed
   segment's `<base>.log.cleaned` file. Reads only the views and writes only `.cleaned` files, so
   it races nothing on the loop (the loader deletes stray `.cleaned` files after a crash).
3. `finish_clean`, on the loop again: for each cleaned segment still in the log and still
   followed by the same segment (retention, truncation or a close since phase 1 replace or drop
   segment objects), drop its index entries, swap the file in (segment_cleaner.swap_in), replace
   the segment object and rebuild its index entries; the `.cleaned` files of the others are
   deleted. Done between requests on the loop, the swap keeps log.py's "Views" contract (a view
   is valid until the log is next modified; a replaced segment's old mapping stays alive).

The checkpoint (`first dirty offset`, everything below it has been cleaned at least once) is held
in memory by the driver, per log object: after a restart (or a log reopened) the whole closed
prefix counts as dirty again, which costs one extra pass and changes nothing. No I/O rate limit
yet: the driver runs one pass at a time, one log at a time, in one thread.

Test-only hook: a `LogCleaner` built in a process whose environment sets
`LOGBROKER_TEST_CLEANER_CRASH_AT` to before_swap, between_renames or after_swap
(segment_cleaner.CRASH_ENV, STEPS) makes that process exit with os._exit (no close, no flush, as
a kill -9) at that step of its first swap, so tests can crash a real broker mid-clean. The
variable is read once, in the constructor; unset (the normal case) there is no hook and no cost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from logbroker.storage.compaction import (
    OFFSET_MAP_ENTRIES_DEFAULT,
    CleanPlan,
    OffsetMap,
    SegmentInfo,
    is_compacted,
    plan_clean,
    plan_prefix_for_map,
    tombstone_expired,
)
from logbroker.storage.log import Log, wall_clock_ms
from logbroker.storage.record_batch import iter_batches
from logbroker.storage.segment import Segment
from logbroker.storage.segment_cleaner import (
    clean_segment,
    crash_hook_from_env,
    map_segment,
    swap_in,
    write_cleaned,
)
from logbroker.storage.segment_indexer import SegmentIndexer

log = logging.getLogger(__name__)

Hook = Callable[[str], None]


@dataclass
class CleanJob:
    """One planned pass: the segments [0, plan.segment_count] (the last one only as the end
    boundary) as they were at planning, and their views."""

    log: Log
    plan: CleanPlan
    segments: list[Segment]
    infos: list[SegmentInfo]
    views: list[memoryview]
    now_ms: int
    offset_map_entries: int
    cleaned: list[bool] = field(default_factory=list)  # per planned segment: .cleaned written
    end_offset: int | None = None  # the new first dirty offset, once run


def plan_log(log: Log, first_dirty_offset: int, now_ms: int) -> CleanPlan | None:
    """compaction.plan_clean for a live log (on the loop)."""
    local = log._local
    if local.closed or not is_compacted(log.config.cleanup_policy):
        return None
    infos = [SegmentInfo(s.base_offset, s.size_bytes, local.retention_timestamp(s)) for s in local.segments]
    return plan_clean(infos, first_dirty_offset, now_ms=now_ms, high_watermark=log.high_watermark,
                      settings=log.config.compaction)


def prepare_clean(log: Log, first_dirty_offset: int, now_ms: int,
                  offset_map_entries: int = OFFSET_MAP_ENTRIES_DEFAULT) -> CleanJob | None:
    """Phase 1 (on the loop): the pass to run, or None if there is nothing to clean."""
    plan = plan_log(log, first_dirty_offset, now_ms)
    if plan is None:
        return None
    local = log._local
    segments = list(local.segments[: plan.segment_count + 1])
    infos = [SegmentInfo(s.base_offset, s.size_bytes, local.retention_timestamp(s)) for s in segments]
    views = [s.view(0, s.size_bytes) for s in segments[: plan.segment_count]]
    return CleanJob(log, plan, segments, infos, views, now_ms, offset_map_entries)


def run_clean(job: CleanJob) -> None:
    """Phase 2 (any thread): the offset map, then the `.cleaned` files of the segments that change."""
    offsets = OffsetMap(job.offset_map_entries)
    mapped = 0
    for view in job.views:
        if not map_segment(view, offsets):
            break
        mapped += 1
    plan = plan_prefix_for_map(job.plan, job.infos, mapped)
    if plan is None:
        return
    retention_ms = job.log.config.delete_retention_ms
    for i in range(plan.segment_count):
        seg, view = job.segments[i], job.views[i]
        mtime_ns = os.stat(seg.path).st_mtime_ns
        expired = tombstone_expired(mtime_ns // 1_000_000, job.now_ms, retention_ms)
        data = clean_segment(view, offsets, expired)
        changed = len(data) != view.nbytes
        if changed:
            write_cleaned(seg.path.parent, seg.path.name, data, mtime_ns)
        job.cleaned.append(changed)
    job.end_offset = plan.end_offset


def finish_clean(job: CleanJob, hook: Hook | None = None) -> int | None:
    """Phase 3 (on the loop): swap in the cleaned segments if every planned segment (and the one
    after them) is still in the log, in place; else delete the `.cleaned` files and swap nothing
    (the offset map was built over all of them: a truncation that dropped later records of a key
    makes the cleaned earlier segments wrong). Returns the new first dirty offset (None: nothing
    cleaned)."""
    local = job.log._local
    start = _position(local.segments, job.segments) if not local.closed else None
    if start is None or job.end_offset is None:
        abandon_clean(job)
        return None
    for i, changed in enumerate(job.cleaned):
        if changed:
            _swap_one(job.log, start + i, job.segments[i], job.segments[i + 1].base_offset, hook)
    job.views.clear()
    return job.end_offset


def abandon_clean(job: CleanJob) -> None:
    """After a failed phase 2: delete the `.cleaned` files it may have written."""
    job.views.clear()
    for seg in job.segments[:-1]:
        try:
            _cleaned_path(seg).unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot delete %s: %s", _cleaned_path(seg), e)


def _cleaned_path(seg: Segment) -> Path:
    return seg.path.parent / (seg.path.name + ".cleaned")


def _position(segments: list[Segment], planned: list[Segment]) -> int | None:
    """Where the planned segments are in the log, if they all still are, in a row (retention may
    have deleted segments before them)."""
    for i, s in enumerate(segments):
        if s is planned[0]:
            here = segments[i : i + len(planned)]
            return i if len(here) == len(planned) and all(a is b for a, b in zip(here, planned, strict=True)) else None
    return None


def _swap_one(log: Log, i: int, seg: Segment, next_base: int, hook: Hook | None) -> None:
    local = log._local
    local.index.delete_offsets(seg.base_offset, next_base)
    swap_in(seg.path.parent, seg.path.name, hook or (lambda step: None))
    new = Segment.open_closed(seg.path, seg.base_offset)
    local.segments[i] = new
    local.size_bytes += new.size_bytes - seg.size_bytes
    seg.close(trim=False)
    indexer = SegmentIndexer(seg.base_offset, log.config.index_interval_bytes)
    entries: list[tuple[int, int, int]] = []
    for h, pos in iter_batches(new.view(0, new.size_bytes)):
        indexer.add(pos, h.batch_length + 12, h.base_offset, -1, entries, [])
    local.index.write(entries)


def clean_log(
    log: Log, first_dirty_offset: int, now_ms: int, hook: Hook | None = None,
    offset_map_entries: int = OFFSET_MAP_ENTRIES_DEFAULT,
) -> int | None:
    """One whole pass in the caller's thread (the loop's); returns the new first dirty offset
    (None: nothing to do)."""
    job = prepare_clean(log, first_dirty_offset, now_ms, offset_map_entries)
    if job is None:
        return None
    run_clean(job)
    return finish_clean(job, hook)


class LogCleaner:
    """The background driver: every `interval_ms`, cleans the dirtiest cleanable compacted log
    (forced ones first, then by dirty ratio) if any, one pass at a time: phases 1 and 3 on the
    event loop (this task), phase 2 in the cleaner's one thread. `logs` returns the logs to
    consider (the log manager's). Keeps each log's first dirty offset in memory (module doc)."""

    def __init__(
        self, logs: Callable[[], Mapping[tuple[str, int], Log]], interval_ms: int,
        now_ms: Callable[[], int] = wall_clock_ms, offset_map_entries: int = OFFSET_MAP_ENTRIES_DEFAULT,
        hook: Hook | None = None,
    ) -> None:
        if interval_ms <= 0:
            raise ValueError(f"log cleaner interval {interval_ms} ms must be > 0")
        self._logs = logs
        self.interval_ms = interval_ms
        self._now_ms = now_ms
        self._offset_map_entries = offset_map_entries
        self._hook = hook if hook is not None else crash_hook_from_env()  # module doc: tests only
        self._first_dirty: dict[tuple[str, int], tuple[Log, int]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self.passes = 0  # passes that swapped something in (for tests and metrics)

    def start(self) -> None:
        if self._task is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="log-cleaner")
            self._task = asyncio.create_task(self._run(), name="log-cleaner")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)  # a running phase 2 only writes .cleaned files
            self._executor = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_ms / 1000)
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad log must not stop the cleaner
                log.exception("log cleaner pass failed")

    def _pick(self, now_ms: int) -> tuple[tuple[str, int], Log, int] | None:
        best: tuple[tuple[bool, float], tuple[str, int], Log, int] | None = None
        for key, plog in self._logs().items():
            held = self._first_dirty.get(key)
            first_dirty = held[1] if held is not None and held[0] is plog else 0
            try:
                plan = plan_log(plog, first_dirty, now_ms)
            except Exception as e:  # an offline or closed log: skip it this time
                log.debug("log cleaner skips %s: %s", key, e)
                continue
            if plan is not None and (best is None or (plan.forced, plan.dirty_ratio) > best[0]):
                best = ((plan.forced, plan.dirty_ratio), key, plog, first_dirty)
        return None if best is None else best[1:]

    async def run_pass(self) -> bool:
        """Clean the dirtiest cleanable log once; True if something was swapped in."""
        now = self._now_ms()
        picked = self._pick(now)
        if picked is None:
            return False
        key, plog, first_dirty = picked
        job = prepare_clean(plog, first_dirty, now, self._offset_map_entries)
        if job is None:
            return False
        read_bytes, started = sum(v.nbytes for v in job.views), time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, run_clean, job)
        except BaseException:
            abandon_clean(job)
            raise
        end = finish_clean(job, self._hook)
        if end is None:
            return False
        self._first_dirty[key] = (plog, end)
        self.passes += 1
        log.info("log cleaner cleaned %s-%d below offset %d (dirty ratio %.2f%s): read %d bytes in %d ms",
                 key[0], key[1], end, job.plan.dirty_ratio,
                 ", forced by max_compaction_lag_ms" if job.plan.forced else "",
                 read_bytes, round((time.monotonic() - started) * 1000))
        return True

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
in memory by the driver, per log object, and, given a `checkpoint_path`, persisted
(cleaner_checkpoint.py: written after each pass that moved an offset, read when the driver is
built, per topic, partition and topic id). A log without an entry (or whose topic id changed, or
reopened while the driver runs) counts as dirty from its start, which costs one extra pass and
changes nothing.

I/O rate: the driver's phase 2 pays for every byte it reads and writes through one
`io_throttle.Throttle` of `io_bytes_per_sec` (0: unlimited; Kafka's
log.cleaner.io.max.bytes.per.second); `stop()` wakes a thread sleeping in it.

Pool: the driver runs up to `threads` passes at once (Kafka's log.cleaner.threads), each on a
different log: a log is marked busy from its pick to the end of its pass, and picks skip busy
logs. They share the one throttle (one rate for the whole cleaner).

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
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from logbroker.storage.cleaner_checkpoint import Entry, read_checkpoint, write_checkpoint
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
from logbroker.storage.io_throttle import Throttle
from logbroker.storage.log import Log, wall_clock_ms
from logbroker.storage.log_identity import read_partition_metadata
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
THREADS_MAX = 16  # log_cleaner_threads bound


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


def run_clean(job: CleanJob, throttle: Throttle | None = None) -> None:
    """Phase 2 (any thread): the offset map, then the `.cleaned` files of the segments that change.
    Every byte read (per batch) and written (per file) is paid for through `throttle` first."""
    offsets = OffsetMap(job.offset_map_entries)
    mapped = 0
    for view in job.views:
        if not map_segment(view, offsets, throttle):
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
        data = clean_segment(view, offsets, expired, throttle)
        changed = len(data) != view.nbytes
        if changed:
            if throttle is not None:
                throttle.consume(len(data))
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
    """The background driver: `threads` tasks (Kafka's cleaner threads), each of which every
    `interval_ms` cleans the dirtiest cleanable compacted log (forced ones first, then by dirty
    ratio) that no other task is cleaning, if any: phases 1 and 3 on the event loop, phase 2 in
    the cleaner's pool of `threads` threads; never two passes on one log at once. `logs` returns the logs to
    consider (the log manager's). Keeps each log's first dirty offset in memory (module doc)."""

    def __init__(
        self, logs: Callable[[], Mapping[tuple[str, int], Log]], interval_ms: int,
        now_ms: Callable[[], int] = wall_clock_ms, offset_map_entries: int = OFFSET_MAP_ENTRIES_DEFAULT,
        hook: Hook | None = None, io_bytes_per_sec: int = 0,
        monotonic_s: Callable[[], float] = time.monotonic, threads: int = 1,
        checkpoint_path: Path | None = None, topic_id_of: Callable[[Log], str | None] | None = None,
    ) -> None:
        if interval_ms <= 0:
            raise ValueError(f"log cleaner interval {interval_ms} ms must be > 0")
        if not 1 <= threads <= THREADS_MAX:
            raise ValueError(f"log cleaner threads {threads} must be in [1, {THREADS_MAX}]")
        self.threads = threads
        self._logs = logs
        self.interval_ms = interval_ms
        self._now_ms = now_ms
        self._offset_map_entries = offset_map_entries
        self._hook = hook if hook is not None else crash_hook_from_env()  # module doc: tests only
        self._stop_event = threading.Event()
        self.throttle = Throttle(io_bytes_per_sec, monotonic_s, self._stop_event.wait)
        self._first_dirty: dict[tuple[str, int], tuple[Log, int]] = {}
        self._checkpoint_path = checkpoint_path
        self._saved = read_checkpoint(checkpoint_path) if checkpoint_path is not None else {}
        self._topic_id_of = topic_id_of or (lambda plog: read_partition_metadata(plog.directory))
        self._topic_ids: dict[tuple[str, int], tuple[Log, str]] = {}
        self._checkpoint_lock = threading.Lock()  # writes in threads, newest snapshot wins
        self._checkpoint_seq = self._checkpoint_written = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: set[tuple[str, int]] = set()  # logs in a pass now: never two passes on one log
        self.passes = 0  # passes that swapped something in (for tests and metrics)

    def start(self) -> None:
        if not self._tasks:
            self._stop_event.clear()
            self._executor = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="log-cleaner")
            self._tasks = [asyncio.create_task(self._run(), name=f"log-cleaner-{i}") for i in range(self.threads)]

    async def stop(self) -> None:
        self._stop_event.set()  # a phase 2 sleeping in the throttle returns; its .cleaned files are abandoned
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
            if key in self._busy:
                continue
            try:
                first_dirty = self._first_dirty_of(key, plog)
                plan = plan_log(plog, first_dirty, now_ms)
            except Exception as e:  # an offline or closed log: skip it this time
                log.debug("log cleaner skips %s: %s", key, e)
                continue
            if plan is not None and (best is None or (plan.forced, plan.dirty_ratio) > best[0]):
                best = ((plan.forced, plan.dirty_ratio), key, plog, first_dirty)
        return None if best is None else best[1:]

    def _first_dirty_of(self, key: tuple[str, int], plog: Log) -> int:
        held = self._first_dirty.get(key)
        if held is not None:
            return held[1] if held[0] is plog else 0
        saved = self._saved.get(key)
        if saved is not None and saved.topic_id == self._topic_id(key, plog):
            return min(saved.first_dirty_offset, plog.log_end_offset)
        return 0

    def _topic_id(self, key: tuple[str, int], plog: Log) -> str | None:
        """The log's topic id ('' if none), read once per log object; None if unreadable."""
        cached = self._topic_ids.get(key)
        if cached is not None and cached[0] is plog:
            return cached[1]
        try:
            topic_id = self._topic_id_of(plog) or ""
        except Exception as e:  # a damaged partition.metadata: no checkpoint entry for it
            log.debug("log cleaner: no topic id for %s: %s", key, e)
            return None
        self._topic_ids[key] = (plog, topic_id)
        return topic_id

    def checkpoint_entries(self) -> dict[tuple[str, int], Entry]:
        """What the checkpoint file is to say now: the logs present with a first dirty offset."""
        entries: dict[tuple[str, int], Entry] = {}
        for key, plog in self._logs().items():
            first_dirty = self._first_dirty_of(key, plog)
            topic_id = self._topic_id(key, plog) if first_dirty > 0 else None
            if topic_id is not None:
                entries[key] = Entry(topic_id, first_dirty)
        return entries

    async def _save_checkpoint(self) -> None:
        path = self._checkpoint_path
        if path is None:
            return
        self._checkpoint_seq += 1
        seq, entries = self._checkpoint_seq, self.checkpoint_entries()

        def write() -> None:
            with self._checkpoint_lock:
                if seq > self._checkpoint_written:  # a newer snapshot may have been written first
                    write_checkpoint(path, entries)
                    self._checkpoint_written = seq

        try:
            await asyncio.to_thread(write)
        except OSError as e:  # the pass is done; the next one writes again
            log.warning("log cleaner: cannot write %s: %s", path, e)

    async def run_pass(self) -> bool:
        """Clean the dirtiest cleanable log that no other pass is cleaning, once; True if something
        was swapped in. Passes may run concurrently (up to `threads` in phase 2 at once)."""
        now = self._now_ms()
        picked = self._pick(now)
        if picked is None:
            return False
        key, plog, first_dirty = picked
        self._busy.add(key)  # before the first await: a concurrent pass picks another log
        try:
            return await self._clean(key, plog, first_dirty, now)
        finally:
            self._busy.discard(key)

    async def _clean(self, key: tuple[str, int], plog: Log, first_dirty: int, now: int) -> bool:
        job = prepare_clean(plog, first_dirty, now, self._offset_map_entries)
        if job is None:
            return False
        read_bytes, started = sum(v.nbytes for v in job.views), time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, run_clean, job, self.throttle)
        except BaseException:
            abandon_clean(job)
            raise
        end = finish_clean(job, self._hook)
        if end is None:
            return False
        self._first_dirty[key] = (plog, end)
        await self._save_checkpoint()
        self.passes += 1
        log.info("log cleaner cleaned %s-%d below offset %d (dirty ratio %.2f%s): read %d bytes in %d ms",
                 key[0], key[1], end, job.plan.dirty_ratio,
                 ", forced by max_compaction_lag_ms" if job.plan.forced else "",
                 read_bytes, round((time.monotonic() - started) * 1000))
        return True

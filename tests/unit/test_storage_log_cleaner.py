"""Compaction of a live log on disk (storage/log_cleaner.py, segment_cleaner.py), and crash
recovery at each step of the swap (a hook raises between steps, then the log is reopened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from logbroker.storage.log import Log
from logbroker.storage.log_cleaner import clean_log
from logbroker.storage.log_config import LogConfig
from logbroker.storage.record_batch import decode_batch, encode_batch, iter_batches
from logbroker.storage.segment_cleaner import STEPS

NOW = 10_000_000
CFG = dict(segment_bytes=4096, index_interval_bytes=256, index_map_bytes=4 << 20, cleanup_policy="compact",
           min_cleanable_dirty_ratio=0.0, delete_retention_ms=0)


class Clock:
    def __call__(self) -> int:
        return NOW


def open_log(path: Path) -> Log:
    return Log.open(path, LogConfig(**CFG), Clock())  # type: ignore[arg-type]


def fill(log: Log, updates: int, keys: int) -> dict[bytes, bytes | None]:
    latest: dict[bytes, bytes | None] = {}
    for i in range(0, updates, 4):
        recs = []
        for j in range(i, min(i + 4, updates)):
            k = b"k%d" % (j % keys)
            v = None if j % 37 == 0 else b"v%d" % j
            latest[k] = v
            recs.append((1000 + j, k, v, None))
        log.append(encode_batch(recs), 0)
    log.high_watermark = log.log_end_offset
    return latest


def records(log: Log) -> list[tuple[int, bytes | None, bytes | None]]:
    out = []
    for seg in log.segments:
        buf = bytes(seg.view(0, seg.size_bytes))
        for h, pos in iter_batches(buf):
            out += [(m.offset, m.key, m.value) for m in decode_batch(buf, pos, h, "t", 0)]
    return out


def check(log: Log, latest: dict[bytes, bytes | None], cleaned: bool) -> None:
    recs = records(log)
    offsets = [o for o, _, _ in recs]
    assert offsets == sorted(set(offsets))  # strictly increasing (decode_batch checked every CRC)
    final = {k: v for _, k, v in recs}
    # the latest record of every key is there; nothing else of a cleaned key before the active segment
    for k, v in latest.items():
        assert final.get(k) == v or (v is None and k not in final)


def test_clean_keeps_latest_per_key_and_offsets(tmp_path: Path) -> None:
    log = open_log(tmp_path / "t-0")
    latest = fill(log, 2000, 20)
    before = log.size_bytes
    assert clean_log(log, 0, NOW) is not None
    assert log.size_bytes < before / 5
    check(log, latest, True)
    closed_end = log.segments[-1].base_offset
    keys_below = [k for o, k, _ in records(log) if o < closed_end]
    assert len(keys_below) == len(set(keys_below))  # one record per key in the cleaned part
    # reads through the log (index rebuilt) see the same, from every offset
    assert log.read(0, 1 << 20)
    log.close()
    log = open_log(tmp_path / "t-0")
    check(log, latest, True)
    log.close()


def test_not_cleaned_below_ratio(tmp_path: Path) -> None:
    log = Log.open(tmp_path / "t-0", LogConfig(**{**CFG, "min_cleanable_dirty_ratio": 0.5}), Clock())  # type: ignore[arg-type]
    fill(log, 400, 20)
    end = clean_log(log, 0, NOW)
    assert end is not None
    assert clean_log(log, end, NOW) is None  # nothing dirty
    log.close()


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("clean_close", [False, True])
def test_crash_at_each_step_then_reopen(tmp_path: Path, step: str, clean_close: bool) -> None:
    log = open_log(tmp_path / "t-0")
    latest = fill(log, 2000, 20)

    def hook(s: str) -> None:
        if s == step:
            raise Crash(s)

    with pytest.raises(Crash):
        clean_log(log, 0, NOW, hook)
    if clean_close:
        log.close()
    else:
        log._abandon()  # a crash: nothing more is written
    log = open_log(tmp_path / "t-0")
    assert not list((tmp_path / "t-0").glob("*.cleaned")) and not list((tmp_path / "t-0").glob("*.swap"))
    check(log, latest, True)
    # the log goes on: clean again, append, read everything
    clean_log(log, 0, NOW)
    check(log, latest, True)
    log.close()


def test_full_recovery_accepts_compaction_gaps(tmp_path: Path) -> None:
    import shutil

    log = open_log(tmp_path / "t-0")
    latest = fill(log, 2000, 20)
    clean_log(log, 0, NOW)
    log._abandon()
    shutil.rmtree(tmp_path / "t-0" / "index.lmdb")  # recovery walks every segment
    log = open_log(tmp_path / "t-0")
    assert not log.recovery_reports
    check(log, latest, True)
    log.close()


def fill_random(log: Log, updates: int, keys: int) -> dict[bytes, bytes | None]:
    """Keys in random order, so cleaned batches keep some of their records (gaps inside batches)."""
    import random

    rng = random.Random(15)
    latest: dict[bytes, bytes | None] = {}
    for i in range(0, updates, 4):
        recs = []
        for j in range(i, i + 4):
            k = b"k%d" % rng.randrange(keys)
            latest[k] = b"v%d" % j
            recs.append((1000 + j, k, latest[k], None))
        log.append(encode_batch(recs), 0)
    log.high_watermark = log.log_end_offset
    return latest


def replicate(leader: Log, follower: Log) -> None:
    """What the fetcher does: read from the follower's log end offset, append as follower."""
    while follower.log_end_offset < leader.high_watermark:
        follower.append_as_follower(bytes(leader.read(follower.log_end_offset, 1 << 16)))


def test_follower_of_compacted_topic_accepts_cleaned_batches(tmp_path: Path) -> None:
    leader = open_log(tmp_path / "leader")
    latest = fill_random(leader, 2000, 300)
    clean_log(leader, 0, NOW)
    assert any(h.record_count < h.last_offset_delta + 1 for seg in leader.segments
               for h, _ in iter_batches(bytes(seg.view(0, seg.size_bytes))))  # gaps inside batches
    follower = open_log(tmp_path / "follower")
    replicate(leader, follower)
    follower.high_watermark = follower.log_end_offset
    assert follower.log_end_offset == leader.log_end_offset
    assert records(follower) == records(leader)
    check(follower, latest, True)
    follower._abandon()  # recovery of the follower's gaps, in its active segment too
    follower = open_log(tmp_path / "follower")
    assert follower.log_end_offset == leader.log_end_offset and records(follower) == records(leader)
    follower.close()
    leader.close()


def test_follower_of_non_compacted_topic_refuses_gaps(tmp_path: Path) -> None:
    from logbroker.errors import CorruptMessageError, OffsetOutOfRangeError

    leader = open_log(tmp_path / "leader")
    fill(leader, 2000, 20)
    clean_log(leader, 0, NOW)
    follower = Log.open(tmp_path / "follower", LogConfig(**{**CFG, "cleanup_policy": "delete"}), Clock())  # type: ignore[arg-type]
    with pytest.raises((CorruptMessageError, OffsetOutOfRangeError)):
        replicate(leader, follower)
    follower.close()
    leader.close()


def test_leader_append_stays_strict_in_compacted_topic(tmp_path: Path) -> None:
    from logbroker.errors import CorruptMessageError

    leader = open_log(tmp_path / "leader")
    fill_random(leader, 2000, 300)
    clean_log(leader, 0, NOW)
    seg = leader.segments[0]
    gappy = next(bytes(seg.view(pos, h.batch_length + 12)) for h, pos in iter_batches(bytes(seg.view(0, seg.size_bytes)))
                 if h.record_count < h.last_offset_delta + 1)
    with pytest.raises(CorruptMessageError):
        leader.append(gappy, 0)
    leader.close()


@pytest.mark.parametrize(("policy", "deleted"), [("compact", False), ("compact,delete", True), ("delete", True)])
def test_retention_follows_cleanup_policy(tmp_path: Path, policy: str, deleted: bool) -> None:
    cfg = {**CFG, "cleanup_policy": policy, "retention_ms": 1000, "retention_bytes": 4096}
    log = Log.open(tmp_path / "t-0", LogConfig(**cfg), Clock())  # type: ignore[arg-type]
    fill(log, 2000, 20)  # record timestamps 1000.., far older than NOW - retention_ms
    segments = len(log.segments)
    assert segments > 3
    assert (log.enforce_retention(NOW) > 0) is deleted
    assert (len(log.segments) < segments) is deleted
    log.close()


def test_pass_in_phases_discards_segments_changed_meanwhile(tmp_path: Path) -> None:
    from logbroker.storage.log_cleaner import finish_clean, prepare_clean, run_clean

    log = open_log(tmp_path / "t-0")
    latest = fill(log, 2000, 20)
    job = prepare_clean(log, 0, NOW)
    assert job is not None
    run_clean(job)
    assert list((tmp_path / "t-0").glob("*.cleaned"))
    cut = job.segments[2].base_offset + 1  # truncation replaces the segments from the third on
    log.truncate_to(cut)
    before = records(log)
    # the log changed under the pass: nothing is swapped (the later records of the keys in the
    # first segments, which the offset map saw, were truncated away)
    assert finish_clean(job) is None
    assert not list((tmp_path / "t-0").glob("*.cleaned"))
    assert records(log) == before
    log.close()
    log = open_log(tmp_path / "t-0")
    assert records(log) == before
    assert clean_log(log, 0, NOW) is not None  # a new pass over the log as it is now
    assert records(log) and records(log)[-1] == before[-1]
    log.close()
    del latest


def test_log_cleaner_driver_cleans_dirtiest_compacted_log_off_the_loop(tmp_path: Path) -> None:
    import asyncio
    import threading

    from logbroker.storage.log_cleaner import LogCleaner

    logs = {("a", 0): open_log(tmp_path / "a-0"), ("b", 0): open_log(tmp_path / "b-0"),
            ("d", 0): Log.open(tmp_path / "d-0", LogConfig(**{**CFG, "cleanup_policy": "delete"}), Clock())}  # type: ignore[arg-type]
    latest = {key: fill(plog, 2000 if key[0] == "b" else 1000, 20) for key, plog in logs.items()}
    sizes = {key: plog.size_bytes for key, plog in logs.items()}
    threads: set[str] = set()

    async def main() -> list[bool]:
        import logbroker.storage.log_cleaner as lc

        real = lc.run_clean

        def spy(job: lc.CleanJob, throttle: object = None) -> None:
            threads.add(threading.current_thread().name)
            real(job, throttle)  # type: ignore[arg-type]

        lc.run_clean = spy  # type: ignore[assignment]
        cleaner = LogCleaner(lambda: logs, 1000, Clock())
        cleaner.start()
        try:
            return [await cleaner.run_pass() for _ in range(3)]
        finally:
            lc.run_clean = real  # type: ignore[assignment]
            await cleaner.stop()

    assert asyncio.run(main()) == [True, True, False]  # a and b once each, d never (delete policy)
    assert threads and all(t.startswith("log-cleaner") for t in threads)
    assert logs[("d", 0)].size_bytes == sizes[("d", 0)]
    for key in (("a", 0), ("b", 0)):
        assert logs[key].size_bytes < sizes[key] / 3
        check(logs[key], latest[key], True)
    for plog in logs.values():
        plog.close()


def test_crash_hook_from_env_is_off_unless_set_and_checks_the_step() -> None:
    from logbroker.storage.segment_cleaner import CRASH_ENV, crash_hook_from_env

    assert crash_hook_from_env({}) is None
    assert crash_hook_from_env({CRASH_ENV: ""}) is None
    assert all(callable(crash_hook_from_env({CRASH_ENV: step})) for step in STEPS)
    with pytest.raises(ValueError, match="not one of"):
        crash_hook_from_env({CRASH_ENV: "mid_swap"})


def test_log_cleaner_driver_calls_its_hook_at_each_swap_step(tmp_path: Path) -> None:
    import asyncio

    from logbroker.storage.log_cleaner import LogCleaner

    plog = open_log(tmp_path / "a-0")
    latest = fill(plog, 1000, 20)
    steps: list[str] = []

    async def main() -> bool:
        cleaner = LogCleaner(lambda: {("a", 0): plog}, 1000, Clock(), hook=steps.append)
        cleaner.start()
        try:
            return await cleaner.run_pass()
        finally:
            await cleaner.stop()

    assert asyncio.run(main())
    assert steps and len(steps) % len(STEPS) == 0
    assert steps[: len(STEPS)] == list(STEPS)  # per swapped segment, in order
    check(plog, latest, True)
    plog.close()


class ManualClock:
    """Seconds; `sleep` advances it."""

    def __init__(self) -> None:
        self.now = 50.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_run_clean_pays_every_byte_read_and_written_through_the_throttle(tmp_path: Path) -> None:
    from logbroker.storage.io_throttle import Throttle
    from logbroker.storage.log_cleaner import finish_clean, prepare_clean, run_clean

    log = open_log(tmp_path / "t-0")
    latest = fill(log, 2000, 20)
    job = prepare_clean(log, 0, NOW)
    assert job is not None
    read_bytes = sum(v.nbytes for v in job.views)
    clock = ManualClock()
    rate = 50_000
    run_clean(job, Throttle(rate, clock.monotonic, clock.sleep, burst_bytes=4096))
    written = sum(p.stat().st_size for p in (tmp_path / "t-0").glob("*.cleaned"))
    assert written > 0
    # the offset map reads every view, the rewrite reads them again and writes the .cleaned files;
    # no token is banked at start and the clock moves only by the throttle's sleeps
    assert clock.now - 50.0 == pytest.approx((2 * read_bytes + written) / rate)
    assert finish_clean(job) is not None
    check(log, latest, True)
    log.close()


def test_log_cleaner_driver_runs_phase_two_through_its_throttle(tmp_path: Path) -> None:
    import asyncio

    from logbroker.storage.io_throttle import Throttle
    from logbroker.storage.log_cleaner import LogCleaner

    plog = open_log(tmp_path / "a-0")
    fill(plog, 1000, 20)
    clock = ManualClock()

    async def main() -> bool:
        cleaner = LogCleaner(lambda: {("a", 0): plog}, 1000, Clock(), io_bytes_per_sec=1 << 20)
        assert cleaner.throttle.bytes_per_sec == 1 << 20
        cleaner.throttle = Throttle(100_000, clock.monotonic, clock.sleep)  # a manual clock instead of the stop event
        cleaner.start()
        try:
            return await cleaner.run_pass()
        finally:
            await cleaner.stop()

    assert asyncio.run(main())
    assert clock.sleeps and clock.now - 50.0 >= plog.size_bytes / 100_000
    plog.close()


def test_log_cleaner_stop_wakes_a_pass_sleeping_in_the_throttle(tmp_path: Path) -> None:
    import asyncio
    import time

    from logbroker.storage.log_cleaner import LogCleaner

    plog = open_log(tmp_path / "a-0")
    fill(plog, 1000, 20)

    async def main() -> float:
        cleaner = LogCleaner(lambda: {("a", 0): plog}, 1000, Clock(), io_bytes_per_sec=1)  # 1 byte/s: hours
        cleaner.start()
        task = asyncio.create_task(cleaner.run_pass())
        await asyncio.sleep(0.2)  # let phase 2 reach its first sleep (not a synchronisation: either way works)
        started = time.monotonic()
        await cleaner.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return time.monotonic() - started

    assert asyncio.run(main()) < 5.0
    plog.close()


def test_log_cleaner_pool_cleans_two_logs_at_once_and_one_log_never_twice(tmp_path: Path) -> None:
    import asyncio
    import threading

    import logbroker.storage.log_cleaner as lc

    logs = {("a", 0): open_log(tmp_path / "a-0"), ("b", 0): open_log(tmp_path / "b-0")}
    latest = {key: fill(plog, 1000, 20) for key, plog in logs.items()}
    both_in_phase_two = threading.Barrier(2, timeout=20)  # breaks unless two phase 2s overlap
    lock = threading.Lock()
    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}
    real = lc.run_clean

    def spy(job: lc.CleanJob, throttle: object = None) -> None:
        name = str(job.log._local.directory)
        with lock:
            in_flight[name] = in_flight.get(name, 0) + 1
            most[name] = max(most.get(name, 0), in_flight[name])
        try:
            both_in_phase_two.wait()
            real(job, throttle)  # type: ignore[arg-type]
        finally:
            with lock:
                in_flight[name] -= 1

    async def main() -> list[bool]:
        lc.run_clean = spy  # type: ignore[assignment]
        cleaner = lc.LogCleaner(lambda: logs, 1000, Clock(), threads=2)
        cleaner.start()
        try:
            # three passes at once over two logs: two run (one per log, in two threads), the third
            # finds every cleanable log busy
            return list(await asyncio.gather(cleaner.run_pass(), cleaner.run_pass(), cleaner.run_pass()))
        finally:
            lc.run_clean = real  # type: ignore[assignment]
            await cleaner.stop()

    assert sorted(asyncio.run(main())) == [False, True, True]
    assert len(most) == 2 and set(most.values()) == {1}
    for key, plog in logs.items():
        check(plog, latest[key], True)
        plog.close()


def test_log_cleaner_threads_are_bounded() -> None:
    from logbroker.storage.log_cleaner import THREADS_MAX, LogCleaner

    for bad in (0, THREADS_MAX + 1):
        with pytest.raises(ValueError, match="threads"):
            LogCleaner(dict, 1000, Clock(), threads=bad)


TOPIC_ID_A = "a" * 32
TOPIC_ID_B = "b" * 32


def run_passes(cleaner_args: dict, logs: dict, passes: int) -> tuple[list[bool], dict]:
    import asyncio

    from logbroker.storage.log_cleaner import LogCleaner

    async def main() -> tuple[list[bool], dict]:
        cleaner = LogCleaner(lambda: logs, 1000, Clock(), **cleaner_args)
        cleaner.start()
        try:
            return [await cleaner.run_pass() for _ in range(passes)], cleaner.checkpoint_entries()
        finally:
            await cleaner.stop()

    return asyncio.run(main())


def test_cleaner_checkpoint_survives_a_restart_and_not_a_recreated_topic(tmp_path: Path) -> None:
    import json

    from logbroker.storage.cleaner_checkpoint import FILE_NAME, read_checkpoint
    from logbroker.storage.log_identity import write_partition_metadata

    path = tmp_path / FILE_NAME
    for name, topic_id in (("a-0", TOPIC_ID_A), ("b-0", "")):
        (tmp_path / name).mkdir()
        if topic_id:
            write_partition_metadata(tmp_path / name, topic_id)
    logs = {("a", 0): open_log(tmp_path / "a-0"), ("b", 0): open_log(tmp_path / "b-0")}
    for plog in logs.values():
        fill(plog, 1000, 20)
    results, _ = run_passes({"checkpoint_path": path}, logs, 3)
    assert results == [True, True, False]
    saved = read_checkpoint(path)
    ends = {key: plog.segments[-1].base_offset for key, plog in logs.items()}
    assert {k: (e.topic_id, e.first_dirty_offset) for k, e in saved.items()} == {
        ("a", 0): (TOPIC_ID_A, ends[("a", 0)]), ("b", 0): ("", ends[("b", 0)])}
    assert json.loads(path.read_text())["version"] == 0
    for plog in logs.values():
        plog.close()

    # a restart on the same directory: the logs reopened, nothing left to clean
    logs = {("a", 0): open_log(tmp_path / "a-0"), ("b", 0): open_log(tmp_path / "b-0")}
    results, entries = run_passes({"checkpoint_path": path}, logs, 2)
    assert results == [False, False]
    assert entries == saved
    # without the checkpoint, the same logs would be cleaned again (min_cleanable_dirty_ratio 0)
    results, _ = run_passes({}, logs, 1)
    assert results == [True]

    # topic a deleted and created again (another id, same name), topic b gone: a is cleaned again
    # from its start, and b's entry is dropped at the next write
    for plog in logs.values():
        plog.close()
    write_partition_metadata(tmp_path / "a-0", TOPIC_ID_B)
    logs = {("a", 0): open_log(tmp_path / "a-0")}
    fill(logs[("a", 0)], 1000, 20)
    results, _ = run_passes({"checkpoint_path": path}, logs, 2)
    assert results == [True, False]
    assert set(read_checkpoint(path)) == {("a", 0)} and read_checkpoint(path)[("a", 0)].topic_id == TOPIC_ID_B
    logs[("a", 0)].close()


@pytest.mark.parametrize("contents", [b"{", b'{"version": 1, "logs": []}', b'{"version": 0, "logs": [{"topic": "a"}]}',
                                      b"\xff\xfe", b'{"version": 0, "logs": [{"topic": "a", "partition": -1, '
                                      b'"topic_id": "", "first_dirty_offset": 3}]}'])
def test_damaged_cleaner_checkpoint_is_ignored(tmp_path: Path, contents: bytes) -> None:
    from logbroker.storage.cleaner_checkpoint import read_checkpoint

    path = tmp_path / "cleaner-offset-checkpoint"
    path.write_bytes(contents)
    assert read_checkpoint(path) == {}
    assert read_checkpoint(tmp_path / "missing") == {}

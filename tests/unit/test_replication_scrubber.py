"""The scrubber's segment walk and throttle, on real segment files written by a Log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from logbroker.replication.replica_manager import ReplicaManager
from logbroker.replication.scrubber import Scrubber, check_batch_at, scan_file, walk_segment
from logbroker.storage.io_throttle import Throttle
from logbroker.storage.log import Log, LogConfig
from logbroker.storage.log_manager import LogManager
from logbroker.storage.record_batch import CRC_START, encode_batch

SMALL = {"segment_bytes": 4096, "index_interval_bytes": 256, "index_map_bytes": 4 << 20}


class ManualClock:
    """Seconds; `sleep` advances it and records each sleep."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def batch(n: int, i: int = 0) -> bytes:
    return encode_batch([(1000 + j, None, bytes([65 + (i + j) % 26]) * 40, None) for j in range(n)])


def filled_log(directory: Path, batches: int = 60) -> Log:
    plog = Log.open(directory, LogConfig(**SMALL))  # type: ignore[arg-type]
    for i in range(batches):
        plog.append(batch(3, i), leader_epoch=0)
    assert plog.segment_count >= 3
    return plog


def flip_bit(path: Path, position: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ (1 << bit)]))


def reader(path: Path):
    data = path.read_bytes()
    return (lambda pos, n: data[pos : pos + n]), len(data)


def test_walk_of_a_good_segment_checks_every_batch(tmp_path):
    plog = filled_log(tmp_path / "t-0")
    seg = plog.segments[1]
    read, size = reader(seg.path)
    checks = list(walk_segment(read, size, seg.base_offset))
    assert checks and all(c.ok for c in checks)
    assert checks[0].offset == seg.base_offset and checks[0].position == 0
    assert sum(c.size_bytes for c in checks) == size
    assert checks[-1].last_offset + 1 == plog.segments[2].base_offset
    assert all(c.record_count == 3 and c.leader_epoch == 0 for c in checks)
    plog.close()


def test_flipped_bit_reports_exactly_that_batch_and_walk_goes_on(tmp_path):
    plog = filled_log(tmp_path / "t-0")
    seg = plog.segments[1]
    path, base = seg.path, seg.base_offset
    good = list(walk_segment(*reader(path), base))
    victim = good[2]
    plog.close()
    flip_bit(path, victim.position + victim.size_bytes - 5, bit=3)  # inside a record value

    checks = list(walk_segment(*reader(path), base))
    assert len(checks) == len(good)  # a CRC failure does not stop the walk
    bad = [c for c in checks if not c.ok]
    assert len(bad) == 1
    assert (bad[0].offset, bad[0].last_offset, bad[0].position) == (victim.offset, victim.last_offset, victim.position)
    assert bad[0].problem == "CRC-32C mismatch"
    result = scan_file(path, base, path.stat().st_size)
    assert result is not None and result.bad_count == 1 and result.bad[0].offset == victim.offset
    assert check_batch_at(path.read_bytes(), victim.position, victim.size_bytes, victim.offset) == "CRC-32C mismatch"
    assert check_batch_at(path.read_bytes(), good[1].position, good[1].size_bytes, good[1].offset) is None


def test_bad_length_stops_the_walk_and_says_so(tmp_path):
    plog = filled_log(tmp_path / "t-0")
    seg = plog.segments[0]
    path, base = seg.path, seg.base_offset
    good = list(walk_segment(*reader(path), base))
    plog.close()
    flip_bit(path, good[1].position + 8, bit=7)  # top bit of batchLength: negative
    checks = list(walk_segment(*reader(path), base))
    assert len(checks) == 2 and checks[0].ok and not checks[1].ok
    assert checks[1].offset == good[1].offset and "batchLength" in (checks[1].problem or "")


def test_throttle_bounds_the_read_rate_with_an_injected_clock(tmp_path):
    plog = filled_log(tmp_path / "t-0", batches=120)
    seg = plog.segments[0]
    read, size = reader(seg.path)
    clock = ManualClock()
    rate = 8192  # bytes per second: chunks of 4096 bytes (the minimum read)
    throttle = Throttle(rate, clock.monotonic, clock.sleep)
    start = clock.now
    checks = list(walk_segment(read, size, seg.base_offset, throttle=throttle))
    elapsed = clock.now - start
    assert all(c.ok for c in checks)
    assert elapsed >= size / rate - 1e-9  # never faster than the rate (no burst banked at start)
    assert elapsed <= size / rate + 4096 / rate  # and not much slower: at most one chunk's worth extra
    assert clock.sleeps and max(clock.sleeps) <= 4096 / rate + 1e-9
    plog.close()


def test_stop_ends_a_walk_between_chunks(tmp_path):
    from logbroker.replication.scrubber import ScrubStopped

    plog = filled_log(tmp_path / "t-0", batches=120)
    seg = plog.segments[0]
    read, size = reader(seg.path)
    stopped = [False]
    clock = ManualClock()

    def sleep(s: float) -> None:
        stopped[0] = True

    walk = walk_segment(read, size, seg.base_offset, throttle=Throttle(4096, clock.monotonic, sleep),
                        stop=lambda: stopped[0])
    with pytest.raises(ScrubStopped):
        list(walk)
    plog.close()


def test_scrubber_pass_flags_a_leader_and_truncates_nothing(tmp_path, caplog):
    async def main() -> None:
        manager = LogManager(tmp_path, LogConfig(**SMALL))  # type: ignore[arg-type]
        rm = ReplicaManager(0, manager)
        part = rm.make_local_leader("t", 0, {k: str(v) for k, v in SMALL.items()})
        for i in range(60):
            part.append_as_leader(batch(3, i))
        seg = part.log.segments[1]
        checks = list(walk_segment(*reader(seg.path), seg.base_offset))
        flip_bit(seg.path, checks[1].position + CRC_START + 3)  # in lastOffsetDelta: inside the CRC
        leo = part.log.log_end_offset
        scrubber = Scrubber(rm, 60_000, 0)
        scrubber.start()
        try:
            assert await scrubber.run_pass() == 1
        finally:
            await scrubber.stop()
        assert part.log.log_end_offset == leo
        assert part.log.corrupt_reason is not None and f"offset {checks[1].offset}" in part.log.corrupt_reason
        manager.close_all()

    asyncio.run(main())
    assert "scrub: t-0 (leader on broker 0) has corrupt batches" in caplog.text


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_scrubber_in_a_cluster_reports_the_bad_replica_to_the_controller(tmp_path, caplog, role):
    """Cluster: a follower truncates and re-fetches and is reported (it leaves the ISR now, not after
    replica_lag_time_max_ms); a leader with another ISR member is reported (leadership moves, then it
    truncates as a follower) and keeps its copy until then."""
    from logbroker.v1 import logbroker_pb2 as pb

    async def main() -> None:
        manager = LogManager(tmp_path, LogConfig(**SMALL))  # type: ignore[arg-type]
        rm = ReplicaManager(0, manager)
        reports: list[tuple[dict, list]] = []
        rm.offline_reporter = lambda offline, recovered: reports.append((offline, recovered))
        part = rm.make_local_leader("t", 0, {k: str(v) for k, v in SMALL.items()})
        for i in range(60):
            part.append_as_leader(batch(3, i))
        leader = 0 if role == "leader" else 1
        resp = await rm.leader_and_isr(pb.LeaderAndIsrRequest(controller_id=1, controller_epoch=1, broker_epoch=100,
                                                              partitions=[
            pb.PartitionState(topic="t", partition=0, controller_epoch=1, leader=leader, leader_epoch=1,
                              isr=[0, 1], replicas=[0, 1], zk_version=1)]), 100)
        assert resp.results[0].error_code == pb.NONE
        seg = part.log.segments[1]
        checks = list(walk_segment(*reader(seg.path), seg.base_offset))
        flip_bit(seg.path, checks[1].position + CRC_START + 3)
        leo = part.log.log_end_offset
        scrubber = Scrubber(rm, 60_000, 0)
        scrubber.start()
        try:
            assert await scrubber.run_pass() == 1
        finally:
            await scrubber.stop()
        bad = checks[1].offset
        assert list(reports[0][0]) == [("t", 0)] and f"corrupt batch at offset {bad}" in reports[0][0][("t", 0)]
        if role == "leader":
            assert part.log.log_end_offset == leo and "reported to the controller" in caplog.text
        else:
            assert part.log.log_end_offset == bad
            # still in the ISR until the controller handles the report: it must not be elected meanwhile
            resp = await rm.leader_and_isr(pb.LeaderAndIsrRequest(controller_id=1, controller_epoch=1, broker_epoch=100,
                                                                  partitions=[
                pb.PartitionState(topic="t", partition=0, controller_epoch=1, leader=0, leader_epoch=2,
                                  isr=[0, 1], replicas=[0, 1], zk_version=2)]), 100)
            assert resp.results[0].error_code == pb.KAFKA_STORAGE_ERROR and not part.is_leader
        await rm.shutdown()
        manager.close_all()

    asyncio.run(main())

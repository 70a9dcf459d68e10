"""Log as a follower replica: append_as_follower keeps offsets and epochs, assign_epoch_start."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logbroker.errors import CorruptMessageError, OffsetOutOfRangeError
from logbroker.storage.log import Log, LogConfig
from logbroker.storage.record_batch import encode_batch, iter_batches, set_base_offset, set_leader_epoch

SMALL = {"segment_bytes": 4096, "index_interval_bytes": 256, "index_map_bytes": 4 << 20}


class Clock:
    def __init__(self) -> None:
        self.now_ms = 10_000_000

    def __call__(self) -> int:
        return self.now_ms


def open_log(path: Path) -> Log:
    return Log.open(path, LogConfig(**SMALL), Clock())  # type: ignore[arg-type]


def batch(n: int = 1, size: int = 20, ts: int = 1000) -> bytes:
    return encode_batch([(ts + i, None, bytes([65 + i % 26]) * size, None) for i in range(n)])


def stamped(raw: bytes, base_offset: int, epoch: int) -> bytes:
    b = bytearray(raw)
    set_base_offset(b, 0, base_offset)
    set_leader_epoch(b, 0, epoch)
    return bytes(b)


def everything(log: Log) -> bytes:
    """All bytes from the log start to the log end offset."""
    out = bytearray()
    offset = log.log_start_offset
    while offset < log.log_end_offset:
        view = log.read(offset, 1 << 20, log.log_end_offset)
        assert view.nbytes
        for h, _pos in iter_batches(view):
            offset = h.next_offset
        out += view
        view.release()
    return bytes(out)


def copy_from(leader: Log, follower: Log, max_bytes: int = 1 << 20) -> None:
    """What a fetcher does: read from the follower's LEO up to the leader's LEO, append as is."""
    while follower.log_end_offset < leader.log_end_offset:
        view = leader.read(follower.log_end_offset, max_bytes, leader.log_end_offset)
        data = bytes(view)
        view.release()
        follower.append_as_follower(data)


@pytest.fixture
def logs(tmp_path: Path):
    leader = open_log(tmp_path / "leader")
    follower = open_log(tmp_path / "follower")
    yield leader, follower
    leader.close()
    follower.close()


def test_follower_copy_is_byte_identical_with_the_same_epochs(logs, tmp_path):
    leader, follower = logs
    leader.append(batch(3), 0)
    leader.append(batch(2), 0)
    leader.assign_epoch_start(2, leader.log_end_offset)
    leader.append(batch(4), 2)
    for _ in range(30):  # enough to roll the 4 KiB segments a few times
        leader.append(batch(5, size=50), 2)
    copy_from(leader, follower, max_bytes=700)
    assert follower.log_end_offset == leader.log_end_offset
    assert everything(follower) == everything(leader)
    assert follower.epochs == leader.epochs == [(0, 0), (2, 5)]
    assert follower.segment_count > 1
    assert follower.end_offset_for_epoch(0) == (0, 5)
    assert follower.end_offset_for_epoch(1) == (0, 5)
    assert follower.high_watermark <= follower.log_end_offset
    follower.close()
    reopened = open_log(tmp_path / "follower")
    try:
        assert reopened.log_end_offset == leader.log_end_offset
        assert reopened.epochs == [(0, 0), (2, 5)]
        assert everything(reopened) == everything(leader)
    finally:
        reopened.close()


def test_follower_log_survives_a_crash(tmp_path):
    leader = open_log(tmp_path / "leader")
    follower = open_log(tmp_path / "follower")
    try:
        for e in range(3):
            leader.assign_epoch_start(e, leader.log_end_offset)
            for _ in range(10):
                leader.append(batch(3, size=40), e)
        copy_from(leader, follower, max_bytes=500)
        follower._abandon()  # no close: the next open recovers
        recovered = open_log(tmp_path / "follower")
        try:
            assert recovered.log_end_offset == leader.log_end_offset
            assert recovered.epochs == leader.epochs
            assert everything(recovered) == everything(leader)
        finally:
            recovered.close()
    finally:
        leader.close()


def test_first_batch_must_start_at_the_log_end_offset(logs):
    _, follower = logs
    with pytest.raises(OffsetOutOfRangeError):
        follower.append_as_follower(stamped(batch(2), 5, 0))
    follower.append_as_follower(stamped(batch(2), 0, 0))
    with pytest.raises(OffsetOutOfRangeError):
        follower.append_as_follower(stamped(batch(2), 0, 0))  # a duplicate
    assert follower.log_end_offset == 2


def test_gap_between_batches_is_refused_whole(logs):
    _, follower = logs
    with pytest.raises(CorruptMessageError, match="does not follow"):
        follower.append_as_follower(stamped(batch(2), 0, 0) + stamped(batch(1), 3, 0))
    assert follower.log_end_offset == 0
    assert follower.epochs == []
    follower.append_as_follower(stamped(batch(2), 0, 0) + stamped(batch(1), 2, 0))
    assert follower.log_end_offset == 3


def test_bad_crc_and_missing_epoch_are_refused(logs):
    _, follower = logs
    bad = bytearray(stamped(batch(2), 0, 0))
    bad[-1] ^= 0xFF
    with pytest.raises(CorruptMessageError, match="CRC"):
        follower.append_as_follower(bytes(bad))
    with pytest.raises(CorruptMessageError, match="leader epoch"):
        follower.append_as_follower(stamped(batch(2), 0, -1))
    with pytest.raises(CorruptMessageError):
        follower.append_as_follower(b"")
    assert follower.log_end_offset == 0


def test_epochs_going_backwards_are_refused(logs):
    _, follower = logs
    follower.append_as_follower(stamped(batch(2), 0, 3))
    with pytest.raises(CorruptMessageError, match="follows epoch 3"):
        follower.append_as_follower(stamped(batch(1), 2, 2))
    with pytest.raises(CorruptMessageError, match="follows epoch 5"):
        follower.append_as_follower(stamped(batch(1), 2, 5) + stamped(batch(1), 3, 4))
    assert follower.log_end_offset == 2
    assert follower.epochs == [(3, 0)]


def test_epoch_started_without_data_is_replaced_by_the_leaders_epochs(logs):
    _, follower = logs
    follower.append_as_follower(stamped(batch(2), 0, 1))
    follower.assign_epoch_start(4, 2)  # it led epoch 4 but wrote nothing
    assert follower.epochs == [(1, 0), (4, 2)]
    # The new leader still writes epoch 1 data at offset 2 (it had it before epoch 4 began).
    follower.append_as_follower(stamped(batch(1), 2, 1))
    assert follower.epochs == [(1, 0)]
    follower.append_as_follower(stamped(batch(1), 3, 5))
    assert follower.epochs == [(1, 0), (5, 3)]
    assert follower.index.epochs() == [(1, 0), (5, 3)]


def test_assign_epoch_start(logs, tmp_path):
    leader, _ = logs
    leader.append(batch(3), 0)
    leader.assign_epoch_start(1, 3)
    assert leader.latest_epoch == 1
    assert leader.end_offset_for_epoch(0) == (0, 3)
    assert leader.end_offset_for_epoch(1) == (1, 3)
    leader.assign_epoch_start(1, 3)  # idempotent
    leader.assign_epoch_start(2, 3)  # epoch 1 got no batch: epoch 2 replaces it
    assert leader.epochs == [(0, 0), (2, 3)]
    assert leader.end_offset_for_epoch(1) == (0, 3)
    leader.append(batch(2), 2)
    assert leader.epochs == [(0, 0), (2, 3)]
    assert leader.index.epochs() == [(0, 0), (2, 3)]
    assert leader.end_offset_for_epoch(2) == (2, 5)
    with pytest.raises(ValueError):
        leader.assign_epoch_start(1, 5)
    with pytest.raises(ValueError):
        leader.assign_epoch_start(3, 6)
    with pytest.raises(ValueError):
        leader.assign_epoch_start(3, 2)


def test_truncate_then_append_as_follower(logs):
    leader, follower = logs
    leader.append(batch(2), 0)
    leader.append(batch(2), 0)
    copy_from(leader, follower)
    follower.append_as_follower(stamped(batch(3), 4, 1))  # a divergent tail in epoch 1
    assert follower.epochs == [(0, 0), (1, 4)]
    follower.truncate_to(4)
    assert follower.epochs == [(0, 0)]
    leader.assign_epoch_start(2, 4)
    leader.append(batch(1), 2)
    copy_from(leader, follower)
    assert everything(follower) == everything(leader)
    assert follower.epochs == leader.epochs == [(0, 0), (2, 4)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 6), st.integers(1, 120)), min_size=1, max_size=25),
    chunk=st.integers(1, 3000),
)
def test_any_history_copies_identically(plan, chunk):
    with tempfile.TemporaryDirectory() as d:
        leader = open_log(Path(d) / "leader")
        follower = open_log(Path(d) / "follower")
        try:
            epoch = 0
            for bump, n, size in plan:
                if bump:
                    epoch += bump
                    leader.assign_epoch_start(epoch, leader.log_end_offset)
                leader.append(batch(n, size), epoch)
            copy_from(leader, follower, max_bytes=chunk)
            assert everything(follower) == everything(leader)
            assert follower.epochs == leader.epochs
            for e in range(-1, epoch + 2):
                assert follower.end_offset_for_epoch(e) == leader.end_offset_for_epoch(e)
        finally:
            leader.close()
            follower.close()


def test_restart_past_the_log_end(logs):
    _, follower = logs
    follower.append_as_follower(stamped(batch(2), 0, 0))
    follower.truncate_fully_and_start_at(50)
    assert (follower.log_start_offset, follower.log_end_offset, follower.high_watermark) == (50, 50, 50)
    assert follower.epochs == []
    follower.append_as_follower(stamped(batch(3), 50, 2))
    assert follower.log_end_offset == 53 and follower.epochs == [(2, 50)]


def test_follower_log_start_follows_the_leaders(logs, tmp_path):
    """Retention on the leader is mirrored: the follower raises its log start offset to the
    leader's (capped at its own high watermark), deleting whole segments below it, and keeps it
    across a reopen (Kafka's maybeIncrementLogStartOffset)."""
    leader, follower = logs
    for e in range(2):
        leader.assign_epoch_start(e, leader.log_end_offset)
        for _ in range(20):
            leader.append(batch(5, size=50), e)
    copy_from(leader, follower, max_bytes=700)
    assert follower.segment_count > 3
    leader.high_watermark = leader.log_end_offset
    leader.update_config(LogConfig(**SMALL, retention_bytes=4096))
    assert leader.enforce_retention() > 0
    lso = leader.log_start_offset
    assert lso > 0
    follower.high_watermark = 10  # the follower has not heard the leader's HW yet: capped there
    assert follower.advance_log_start_offset(lso) >= 0 and follower.log_start_offset == 10
    follower.high_watermark = follower.log_end_offset
    before = follower.segment_count
    assert follower.advance_log_start_offset(lso) > 0
    assert follower.log_start_offset == lso and follower.segment_count < before
    assert follower.segments[0].base_offset <= lso
    assert follower.epochs[0][1] == lso  # the epoch spanning the new start now starts there
    with pytest.raises(OffsetOutOfRangeError):
        follower.read(lso - 1, 1 << 20, follower.log_end_offset)
    assert everything(follower) == everything(leader)[-len(everything(follower)):]
    assert follower.advance_log_start_offset(lso - 5) == 0 and follower.log_start_offset == lso  # never back
    follower.close()
    reopened = open_log(tmp_path / "follower")
    try:
        assert reopened.log_start_offset == lso
    finally:
        reopened.close()

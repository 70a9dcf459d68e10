"""Log: idempotent producers' batches (storage/log.py with producer_state.py): duplicates answered
with the original offsets and not written, gaps and fenced epochs refused with nothing written,
the state rebuilt from batch headers when the log opens and kept by follower appends."""

from __future__ import annotations

from pathlib import Path

import pytest

from logbroker.errors import (
    DuplicateSequenceNumberError,
    InvalidProducerEpochError,
    OutOfOrderSequenceNumberError,
)
from logbroker.storage.log import Log, LogConfig
from logbroker.storage.record_batch import BatchBuilder, iter_batches

CONFIG = LogConfig(segment_bytes=4096, index_interval_bytes=256, index_map_bytes=4 << 20)


class Clock:
    def __init__(self) -> None:
        self.now_ms = 10_000_000

    def __call__(self) -> int:
        return self.now_ms


def pbatch(pid: int, epoch: int, seq: int, n: int = 2, ts: int = 1000) -> bytes:
    b = BatchBuilder(ts)
    for i in range(n):
        b.append(ts + i, None, b"v%d" % (seq + i), None)
    return b.build(pid, epoch, seq)


def test_duplicate_answers_original_offsets_and_writes_nothing(tmp_path: Path) -> None:
    log = Log.open(tmp_path / "t-0", CONFIG)
    first = log.append(pbatch(5, 0, 0), 0)
    log.append(pbatch(5, 0, 2), 0)
    end, size = log.log_end_offset, log.size_bytes
    again = log.append(pbatch(5, 0, 0), 0)
    assert again.duplicate and (again.base_offset, again.last_offset) == (first.base_offset, first.last_offset)
    assert (log.log_end_offset, log.size_bytes) == (end, size)
    assert not log.append(pbatch(5, 0, 4), 0).duplicate
    log.close()


def test_gap_and_fenced_epoch_are_refused_with_nothing_written(tmp_path: Path) -> None:
    log = Log.open(tmp_path / "t-0", CONFIG)
    log.append(pbatch(5, 1, 0), 0)
    end = log.log_end_offset
    with pytest.raises(OutOfOrderSequenceNumberError, match="expected 2"):
        log.append(pbatch(5, 1, 3), 0)
    with pytest.raises(InvalidProducerEpochError):
        log.append(pbatch(5, 0, 2), 0)
    with pytest.raises(DuplicateSequenceNumberError):
        log.append(pbatch(5, 1, 0) + pbatch(6, 0, 0), 0)
    assert log.log_end_offset == end
    log.append(pbatch(5, 2, 0), 0)  # a bumped epoch starts at 0
    log.close()


def test_several_batches_of_one_producer_in_one_payload_must_follow_each_other(tmp_path: Path) -> None:
    log = Log.open(tmp_path / "t-0", CONFIG)
    log.append(pbatch(5, 0, 0) + pbatch(5, 0, 2), 0)
    with pytest.raises(OutOfOrderSequenceNumberError, match="same request"):
        log.append(pbatch(5, 0, 4) + pbatch(5, 0, 7), 0)
    assert log.log_end_offset == 4
    log.close()


def test_non_idempotent_batches_are_never_checked(tmp_path: Path) -> None:
    log = Log.open(tmp_path / "t-0", CONFIG)
    plain = pbatch(-1, -1, -1)
    log.append(plain, 0)
    assert not log.append(plain, 0).duplicate
    assert log.log_end_offset == 4 and len(log.producers) == 0
    log.close()


@pytest.mark.parametrize("clean", [True, False])
def test_state_is_rebuilt_from_batch_headers_when_the_log_opens(tmp_path: Path, clean: bool) -> None:
    log = Log.open(tmp_path / "t-0", CONFIG)
    offsets = [log.append(pbatch(5, 0, seq), 0).base_offset for seq in range(0, 200, 2)]  # rolls several segments
    assert log.segment_count > 1
    if clean:
        log.close()
    else:
        log._abandon()  # a crash: no clean-shutdown marker
    log = Log.open(tmp_path / "t-0", CONFIG)
    again = log.append(pbatch(5, 0, 198), 0)
    assert again.duplicate and again.base_offset == offsets[-1]
    with pytest.raises(OutOfOrderSequenceNumberError):
        log.append(pbatch(5, 0, 210), 0)
    assert not log.append(pbatch(5, 0, 200), 0).duplicate
    log.close()


def test_follower_appends_keep_the_same_state_and_truncation_forgets(tmp_path: Path) -> None:
    leader = Log.open(tmp_path / "l-0", CONFIG)
    follower = Log.open(tmp_path / "f-0", CONFIG)
    leader.append(pbatch(5, 0, 0), 0)
    leader.append(pbatch(5, 0, 2), 0)
    follower.append_as_follower(bytes(leader.read(0, 1 << 20, leader.log_end_offset)))
    # the follower becomes leader: the resent batch is still a duplicate
    dup = follower.append(pbatch(5, 0, 2), 1)
    assert dup.duplicate and dup.base_offset == 2
    follower.truncate_to(2)
    assert not follower.append(pbatch(5, 0, 2), 1).duplicate  # its original is gone: written again
    assert follower.log_end_offset == 4
    [(header, _)] = iter_batches(bytes(follower.read(2, 1 << 20, follower.log_end_offset)))
    assert (header.base_offset, header.base_sequence) == (2, 2)
    leader.close()
    follower.close()


def test_idle_producers_expire_by_the_logs_clock(tmp_path: Path) -> None:
    clock = Clock()
    config = LogConfig(segment_bytes=1 << 20, index_map_bytes=4 << 20, producer_id_expiration_ms=1000)
    log = Log.open(tmp_path / "t-0", config, now_ms=clock)
    log.append(pbatch(5, 0, 0), 0)
    clock.now_ms += 1000
    log.append(pbatch(6, 0, 0), 0)  # an append runs the expiry
    assert log.producers.entry(5) is None and log.producers.entry(6) is not None
    assert not log.append(pbatch(5, 0, 40), 0).duplicate  # unknown again: any sequence is accepted
    log.close()


def test_expiration_is_a_topic_config() -> None:
    from logbroker.cluster.metadata import normalize_topic_config
    from logbroker.errors import InvalidConfigError

    config = normalize_topic_config({"producer.id.expiration.ms": "5000"})
    assert LogConfig.from_topic_config(config).producer_id_expiration_ms == 5000
    with pytest.raises(InvalidConfigError):
        normalize_topic_config({"producer_id_expiration_ms": "0"})

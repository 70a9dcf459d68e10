"""LogManager: every partition log under one data directory."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from logbroker.errors import InvalidPartitionsError, InvalidTopicError
from logbroker.storage.flusher import SegmentFlusher
from logbroker.storage.log import CLEAN_SHUTDOWN_FILE, LogConfig
from logbroker.storage.log_identity import REGISTRY_FILE
from logbroker.storage.log_manager import LogManager, parse_log_dir_name
from logbroker.storage.record_batch import encode_batch

CONFIG = LogConfig(segment_bytes=1024, index_interval_bytes=256, index_map_bytes=4 << 20)


def batch(ts: int = 1000) -> bytes:
    return encode_batch([(ts, None, b"x" * 100, None)])


@pytest.fixture
def manager(tmp_path):
    m = LogManager(tmp_path / "data", CONFIG, now_ms=lambda: 10_000)
    yield m
    m.close_all()


def test_parse_log_dir_name():
    assert parse_log_dir_name("orders-0") == ("orders", 0)
    assert parse_log_dir_name("my-topic-12") == ("my-topic", 12)
    assert parse_log_dir_name("a.b_c-3") == ("a.b_c", 3)
    for bad in ("orders", "orders-", "-1", "orders-x", "orders-01", "orders-1.5", "orders-١", "..-0", "index.lmdb"):
        assert parse_log_dir_name(bad) is None, bad


def test_create_get_and_reload(manager, tmp_path):
    log = manager.create_log("orders", 0)
    assert manager.create_log("orders", 0) is log  # idempotent
    assert manager.get_log("orders", 0) is log and manager.get_log("orders", 1) is None
    log.append(batch(), 0)
    manager.create_log("my-topic", 3, LogConfig(segment_bytes=2048)).append(batch(), 0)
    assert set(manager.logs()) == {("orders", 0), ("my-topic", 3)}
    assert (tmp_path / "data" / "orders-0").is_dir() and (tmp_path / "data" / "my-topic-3").is_dir()
    manager.close_all()
    assert manager.logs() == {}

    again = LogManager(tmp_path / "data", CONFIG)
    logs = again.load_all(configs={"my-topic": LogConfig(segment_bytes=2048)})
    assert set(logs) == {("orders", 0), ("my-topic", 3)}
    assert logs[("orders", 0)].log_end_offset == 1
    assert logs[("my-topic", 3)].config.segment_bytes == 2048
    assert all(log.recovery_reports == [] for log in logs.values())
    again.close_all()


@pytest.mark.parametrize("topic", ["", ".", "..", "a/b", "../escape", "x" * 250, "sp ace", "ü"])
def test_create_rejects_bad_topic_names(manager, tmp_path, topic):
    with pytest.raises(InvalidTopicError):
        manager.create_log(topic, 0)
    assert list((tmp_path / "data").iterdir()) == []


def test_create_rejects_bad_partitions(manager):
    for p in (-1, 10_000):
        with pytest.raises(InvalidPartitionsError):
            manager.create_log("orders", p)


def test_delete_log_renames_then_removes(manager, tmp_path):
    manager.create_log("orders", 0).append(batch(), 0)
    assert manager.delete_log("orders", 0)
    assert manager.get_log("orders", 0) is None
    manager.registry.save()  # else written behind (log_identity.py)
    assert [p.name for p in (tmp_path / "data").iterdir()] == [REGISTRY_FILE]
    assert manager.registry.get(("orders", 0)) is None
    assert not manager.delete_log("orders", 0)
    # a log on disk that is not open can be deleted too
    manager.create_log("orders", 1)
    manager.close_all()
    assert manager.delete_log("orders", 1)
    manager.registry.save()
    assert [p.name for p in (tmp_path / "data").iterdir()] == [REGISTRY_FILE]
    assert LogManager(tmp_path / "data", CONFIG).registry.get(("orders", 1)) is None


def test_load_all_finishes_interrupted_deletes_and_ignores_strays(tmp_path):
    data = tmp_path / "data"
    m = LogManager(data, CONFIG)
    m.create_log("orders", 0).append(batch(), 0)
    m.close_all()
    doomed = data / ("orders-0." + "ab" * 16 + "-delete")
    (data / "orders-0").rename(doomed)  # a crash right after the rename
    (data / "metadata.lmdb").mkdir()  # someone else's files
    (data / "stray.txt").write_text("x")
    (data / "weird-name").mkdir()
    m = LogManager(data, CONFIG)
    assert m.load_all() == {}
    assert not doomed.exists()
    assert {p.name for p in data.iterdir()} == {"metadata.lmdb", "stray.txt", "weird-name", REGISTRY_FILE}
    m.close_all()


def test_enforce_retention_over_all_logs(manager):
    for p in range(3):
        log = manager.create_log("orders", p, LogConfig(segment_bytes=1024, retention_ms=1000))
        for i in range(30):
            log.append(batch(ts=i), 0)
        log.high_watermark = log.log_end_offset
    deleted = manager.enforce_retention(now_ms=10**9)
    assert deleted > 0
    assert all(log.segment_count == 1 for log in manager.logs().values())
    assert manager.enforce_retention(now_ms=10**9) == 0


def test_logs_share_the_managers_flusher_and_close_all_waits_for_it(tmp_path):
    started = threading.Event()
    allowed = threading.Event()
    synced: list[int] = []

    def slow_fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            started.set()
            assert allowed.wait(30), "fsync never allowed"
            synced.append(fd)
        os.fsync(fd)

    flusher = SegmentFlusher(fsync=slow_fsync, wait_timeout_s=30)
    m = LogManager(tmp_path / "data", CONFIG, now_ms=lambda: 10_000, flusher=flusher)
    log = m.create_log("orders", 0)
    for _ in range(20):
        log.append(batch(), 0)
    assert log.segment_count > 1 and log.pending_flushes
    assert started.wait(30)  # the manager's flusher is the one at work
    assert log.recovery_point == 0
    releaser = threading.Thread(target=allowed.set)
    releaser.start()
    m.close_all()
    releaser.join(30)
    assert len(synced) == log.segment_count - 1
    assert (tmp_path / "data" / "orders-0" / CLEAN_SHUTDOWN_FILE).exists()
    flusher.shutdown(wait=True)


def test_load_all_preallocates_by_the_topics_config_or_the_logs_checkpoint(tmp_path):
    """A restart must not preallocate the default segment size (128 MiB) for every partition: each
    active segment is sized by its topic's config, or (config not known yet) by its own checkpoint."""
    data = tmp_path / "data"
    m = LogManager(data, CONFIG, now_ms=lambda: 10_000)
    m.create_log("small", 0, LogConfig(segment_bytes=2048, index_map_bytes=4 << 20)).append(batch(), 0)
    m.create_log("other", 0, LogConfig(segment_bytes=4096, index_map_bytes=4 << 20)).append(batch(), 0)
    m.close_all()
    big_default = LogConfig(segment_bytes=64 << 20, index_map_bytes=4 << 20)
    m = LogManager(data, big_default, now_ms=lambda: 10_000)
    logs = m.load_all({"small": LogConfig(segment_bytes=8192, index_map_bytes=4 << 20)})
    assert logs[("small", 0)].segments[-1].capacity_bytes == 8192  # the topic's config
    assert logs[("other", 0)].segments[-1].capacity_bytes == 4096  # the log's checkpoint
    assert logs[("other", 0)].config.segment_bytes == 4096
    m.close_all()


def test_checkpoint_high_watermarks_writes_only_moved_ones(manager):
    a = manager.create_log("a", 0)
    b = manager.create_log("b", 0)
    for plog in (a, b):
        plog.append(batch(), 0)
    assert manager.checkpoint_high_watermarks() == 0  # nothing moved
    a.high_watermark = 1
    assert manager.checkpoint_high_watermarks() == 1
    assert manager.checkpoint_high_watermarks() == 0

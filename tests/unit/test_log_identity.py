"""Topic ids with logs (partition.metadata), the registry of created logs, and how LogManager and the
standalone metadata store apply them."""

from __future__ import annotations

import shutil
import threading
import uuid

import pytest

from logbroker.cluster.local_store import LocalMetadataStore, _spec_to_json
from logbroker.cluster.metadata import TopicSpec
from logbroker.errors import StorageError
from logbroker.storage import log_identity
from logbroker.storage.log import LogConfig
from logbroker.storage.log_identity import (
    PARTITION_METADATA_FILE,
    REGISTRY_FILE,
    Identity,
    LogRegistry,
    LostLogError,
    check_identity,
    read_partition_metadata,
    was_lost,
    write_atomically,
    write_partition_metadata,
)
from logbroker.storage.log_manager import LogManager
from logbroker.storage.record_batch import encode_batch
from tests.conftest import wait_for

CONFIG = LogConfig(segment_bytes=1 << 16, index_interval_bytes=256, index_map_bytes=4 << 20)
OLD = "0" * 31 + "1"
NEW = "0" * 31 + "2"


def batch() -> bytes:
    return encode_batch([(1000, None, b"x" * 100, None)])


# -- the pure rules --------------------------------------------------------------------------------

def test_check_identity():
    assert check_identity(OLD, OLD) is Identity.MATCH
    assert check_identity(OLD, NEW) is Identity.MISMATCH
    assert check_identity(None, NEW) is Identity.ADOPT  # a log from before topic ids
    assert check_identity(OLD, "") is Identity.MATCH  # nothing to check against


def test_was_lost():
    assert not was_lost(None, NEW)  # never created here: a brand-new partition
    assert was_lost(NEW, NEW)
    assert not was_lost(OLD, NEW)  # the log of a deleted incarnation: not this topic's loss
    assert was_lost("", NEW) and was_lost(OLD, "")  # unknown ids: assume the worst


# -- files -----------------------------------------------------------------------------------------

def test_partition_metadata_round_trip_and_damage(tmp_path):
    assert read_partition_metadata(tmp_path) is None
    write_partition_metadata(tmp_path, NEW)
    assert (tmp_path / PARTITION_METADATA_FILE).read_text() == f"version: 0\ntopic_id: {NEW}\n"
    assert read_partition_metadata(tmp_path) == NEW
    (tmp_path / PARTITION_METADATA_FILE).write_text("version: 0\ntopic_id: nonsense\n")
    with pytest.raises(StorageError, match="damaged"):
        read_partition_metadata(tmp_path)
    with pytest.raises(ValueError):
        write_partition_metadata(tmp_path, "../x")


def test_registry_persists_and_survives_damage(tmp_path):
    r = LogRegistry(tmp_path)
    r.record(("orders-eu", 3), NEW)
    r.record(("orders-eu", 3), "")  # an unknown id does not erase a known one
    r.save()  # else written behind, by the writer thread or close()
    assert LogRegistry(tmp_path).get(("orders-eu", 3)) == NEW
    r.forget(("orders-eu", 3))
    r.close()
    assert LogRegistry(tmp_path).get(("orders-eu", 3)) is None
    (tmp_path / "log-registry.json").write_text("{not json")
    assert LogRegistry(tmp_path).get(("orders-eu", 3)) is None  # logged, started afresh


# -- LogManager ------------------------------------------------------------------------------------

def test_log_of_another_topic_id_is_deleted_not_served(tmp_path):
    m = LogManager(tmp_path, CONFIG)
    m.create_log("orders", 0, topic_id=OLD).append(batch(), 0)
    m.close_all()
    m = LogManager(tmp_path, CONFIG)
    assert m.load_all()[("orders", 0)].log_end_offset == 1
    fresh = m.create_log("orders", 0, topic_id=NEW)  # the topic was deleted and created again
    assert fresh.log_end_offset == 0
    m.registry.save()
    assert read_partition_metadata(tmp_path / "orders-0") == NEW
    assert m.registry.get(("orders", 0)) == NEW
    m.close_all()


def test_log_on_disk_not_loaded_is_checked_too(tmp_path):
    m = LogManager(tmp_path, CONFIG)
    m.create_log("orders", 0, topic_id=OLD).append(batch(), 0)
    m.close_all()
    m = LogManager(tmp_path, CONFIG)  # no load_all
    assert m.create_log("orders", 0, topic_id=NEW).log_end_offset == 0
    m.close_all()


def test_same_id_is_served_and_legacy_log_adopts_the_id(tmp_path):
    m = LogManager(tmp_path, CONFIG)
    m.create_log("orders", 0).append(batch(), 0)  # no id: as before topic ids
    m.close_all()
    assert read_partition_metadata(tmp_path / "orders-0") is None
    m = LogManager(tmp_path, CONFIG)
    m.load_all()
    assert m.create_log("orders", 0, topic_id=NEW).log_end_offset == 1
    assert m.registry.partition_metadata(tmp_path / "orders-0") == NEW  # at once, written behind
    m.close_all()
    assert read_partition_metadata(tmp_path / "orders-0") == NEW
    m = LogManager(tmp_path, CONFIG)
    m.load_all()
    assert m.create_log("orders", 0, topic_id=NEW).log_end_offset == 1
    m.close_all()


def test_vanished_log_is_refused_until_loss_is_accepted(tmp_path):
    m = LogManager(tmp_path, CONFIG)
    m.create_log("orders", 0, topic_id=NEW).append(batch(), 0)
    m.close_all()
    shutil.rmtree(tmp_path / "orders-0")
    m = LogManager(tmp_path, CONFIG)
    m.load_all()
    with pytest.raises(LostLogError, match="orders-0"):
        m.create_log("orders", 0, topic_id=NEW)
    assert not (tmp_path / "orders-0").exists()  # nothing created on a guess
    # a brand-new partition, and the same name for a new topic incarnation, are created silently
    assert m.create_log("orders", 1, topic_id=NEW).log_end_offset == 0
    assert m.create_log("orders", 0, topic_id=OLD).log_end_offset == 0
    m.delete_log("orders", 0)
    m.registry.record(("orders", 0), NEW)
    recovered = m.create_log("orders", 0, topic_id=NEW, accept_loss=True)
    assert recovered.log_end_offset == 0
    m.close_all()


# -- the standalone metadata store -----------------------------------------------------------------

def test_local_store_assigns_ids_to_old_topics_and_new_ones(tmp_path):
    store = LocalMetadataStore(tmp_path)
    with store._env.begin(write=True, db=store._topics) as txn:  # as written before topic ids
        txn.put(b"legacy", _spec_to_json(TopicSpec("legacy", {0: [0]}, {})))
    store.close()
    store = LocalMetadataStore(tmp_path)
    legacy = store.get_topic("legacy")
    assert legacy is not None and uuid.UUID(hex=legacy.topic_id)
    spec = TopicSpec("fresh", {0: [0]}, {})
    store.create_topic(spec)
    fresh = store.get_topic("fresh")
    assert fresh is not None and fresh.topic_id == spec.topic_id and fresh.topic_id != legacy.topic_id
    store.close()
    store = LocalMetadataStore(tmp_path)
    again = store.get_topic("legacy")
    assert again is not None and again.topic_id == legacy.topic_id  # assigned once
    store.close()


# -- written behind: O(changes), off the caller's thread (log_identity.py) ----------------------------

class CountingWrite:
    """An injected `write_atomically`: counts writes per file name and the threads that made them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.names: list[str] = []
        self.threads: set[int] = set()
        self.fail_first = fail_first

    def __call__(self, path, data: bytes) -> None:
        if self.fail_first > 0:
            self.fail_first -= 1
            raise OSError(28, "No space left on device")
        self.names.append(path.name)
        self.threads.add(threading.get_ident())
        write_atomically(path, data)


def test_creating_many_logs_writes_the_registry_once_not_per_log(tmp_path, monkeypatch):
    writes = CountingWrite()
    monkeypatch.setattr(log_identity, "write_atomically", writes)
    n = 300  # the same with 2,000 or 10,000; kept small for time (each log is a directory, an index, a segment)
    m = LogManager(tmp_path, CONFIG, registry_write_interval_ms=3_600_000)  # the writer waits: all at close
    ids = {p: f"{p:032x}" for p in range(n)}
    for p in range(n):
        m.create_log("orders", p, topic_id=ids[p])
    assert writes.names == []  # nothing written on the caller's thread
    assert m.registry.partition_metadata(tmp_path / "orders-7") == ids[7]
    m.close_all()
    assert writes.names.count(REGISTRY_FILE) == 1  # was n: the whole file rewritten per log
    assert writes.names.count(PARTITION_METADATA_FILE) == n  # one per new log, none twice
    again = LogManager(tmp_path, CONFIG)
    assert again.registry.items() == sorted((("orders", p), ids[p]) for p in range(n))
    assert read_partition_metadata(tmp_path / f"orders-{n - 1}") == ids[n - 1]
    assert again.lost_logs() == []


def test_writer_thread_writes_behind_the_caller(tmp_path, monkeypatch):
    writes = CountingWrite()
    monkeypatch.setattr(log_identity, "write_atomically", writes)
    m = LogManager(tmp_path, CONFIG, registry_write_interval_ms=10)
    m.create_log("orders", 0, topic_id=NEW)
    wait_for(lambda: not m.registry.unwritten, 10, "the registry written")
    assert LogRegistry(tmp_path).get(("orders", 0)) == NEW
    assert read_partition_metadata(tmp_path / "orders-0") == NEW
    assert writes.threads and threading.get_ident() not in writes.threads  # not on the caller's (event loop's)
    wait_for(lambda: m.registry._writer is None, 10, "the writer thread ends once all is written")
    m.close_all()


def test_pending_partition_metadata_is_checked_and_never_written_into_a_deleted_log(tmp_path, monkeypatch):
    writes = CountingWrite()
    monkeypatch.setattr(log_identity, "write_atomically", writes)
    m = LogManager(tmp_path, CONFIG, registry_write_interval_ms=3_600_000)
    m.create_log("orders", 0, topic_id=OLD).append(batch(), 0)
    assert m.create_log("orders", 0, topic_id=NEW).log_end_offset == 0  # OLD, not yet on disk, still counts
    m.create_log("orders", 1, topic_id=NEW)
    m.delete_log("orders", 1)
    m.close_all()
    assert writes.names.count(PARTITION_METADATA_FILE) == 1  # orders-0 as NEW only
    assert read_partition_metadata(tmp_path / "orders-0") == NEW
    assert not (tmp_path / "orders-1").exists()
    assert LogRegistry(tmp_path).items() == [(("orders", 0), NEW)]


def test_a_failing_write_is_logged_once_and_retried(tmp_path, caplog):
    writes = CountingWrite(fail_first=5)
    r = LogRegistry(tmp_path, write_interval_ms=1, write=writes)
    r.record(("orders", 0), NEW)
    wait_for(lambda: not r.unwritten, 10, "the registry written after the disk recovered")
    assert LogRegistry(tmp_path).get(("orders", 0)) == NEW
    assert sum("No space left" in rec.getMessage() for rec in caplog.records) == 1
    r.close()


def test_registry_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(log_identity, "REGISTRY_LOGS_MAX", 2)
    r = LogRegistry(tmp_path, write_interval_ms=3_600_000)
    r.record(("orders", 0), NEW)
    r.record(("orders", 1), NEW)
    r.record(("orders", 1), NEW)  # known: no new entry
    with pytest.raises(StorageError, match="more than 2 logs"):
        r.record(("orders", 2), NEW)
    r.close()

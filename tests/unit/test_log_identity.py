"""Topic ids with logs (partition.metadata), the registry of created logs, and how LogManager and the
standalone metadata store apply them."""

from __future__ import annotations

import shutil
import uuid

import pytest

from logbroker.cluster.local_store import LocalMetadataStore, _spec_to_json
from logbroker.cluster.metadata import TopicSpec
from logbroker.errors import StorageError
from logbroker.storage.log import LogConfig
from logbroker.storage.log_identity import (
    PARTITION_METADATA_FILE,
    Identity,
    LogRegistry,
    LostLogError,
    check_identity,
    read_partition_metadata,
    was_lost,
    write_partition_metadata,
)
from logbroker.storage.log_manager import LogManager
from logbroker.storage.record_batch import encode_batch

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
    assert LogRegistry(tmp_path).get(("orders-eu", 3)) == NEW
    r.forget(("orders-eu", 3))
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
    assert read_partition_metadata(tmp_path / "orders-0") == NEW
    m.close_all()
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

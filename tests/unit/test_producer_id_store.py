"""Producer ids from the standalone metadata store (cluster/producer_id_store.py over LMDB)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logbroker.cluster.local_store import LocalMetadataStore
from logbroker.cluster.producer_id_store import EPOCH_MAX, next_named
from logbroker.errors import InvalidRequestError


def test_blocks_never_overlap_across_reopens(tmp_path: Path) -> None:
    store = LocalMetadataStore(tmp_path)
    ids = store.producer_ids()
    assert ids.allocate_block(10) == 0
    assert ids.allocate_block(10) == 10
    store.close()
    store = LocalMetadataStore(tmp_path)
    assert store.producer_ids().allocate_block(5) == 20
    store.close()


def test_a_named_producer_keeps_its_id_and_bumps_its_epoch(tmp_path: Path) -> None:
    store = LocalMetadataStore(tmp_path)
    ids = store.producer_ids()
    fresh = iter(range(100, 200))
    assert ids.bump_named("orders", lambda: next(fresh)) == (100, 0)
    assert ids.bump_named("orders", lambda: next(fresh)) == (100, 1)
    assert ids.bump_named("other", lambda: next(fresh)) == (101, 0)
    store.close()
    store = LocalMetadataStore(tmp_path)
    assert store.producer_ids().bump_named("orders", lambda: next(fresh)) == (100, 2)
    store.close()


def test_epoch_exhaustion_takes_a_new_id_and_bad_names_are_refused(tmp_path: Path) -> None:
    raw = json.dumps({"producer_id": 7, "epoch": EPOCH_MAX}).encode()
    assert next_named(raw, lambda: 8) == {"producer_id": 8, "epoch": 0}
    store = LocalMetadataStore(tmp_path)
    with pytest.raises(InvalidRequestError):
        store.producer_ids().bump_named("x" * 250, lambda: 1)
    store.close()


def test_the_broker_side_takes_blocks_for_named_and_anonymous_producers(tmp_path: Path) -> None:
    from logbroker.server.apis.producer_ids import ProducerIdApis

    store = LocalMetadataStore(tmp_path)
    ids = store.producer_ids()
    apis = ProducerIdApis(lambda: ids, block_size=2)
    assert apis._init("orders") == (0, 0)  # a new block taken inside the named path
    assert apis._init("") == (1, 0)
    assert apis._init("") == (2, 0)  # the next block
    assert apis._init("orders") == (0, 1)
    store.close()

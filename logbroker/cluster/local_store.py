"""The embedded metadata store of a standalone broker: the `MetadataStore` interface over local LMDB.

Layout, in `<data_dir>/__cluster_metadata/` (an LMDB environment, synced on every write: this is the
source of truth for which topics exist):

    db "topics":   topic name (utf-8)            -> JSON {"assignment": {p: [replicas]}, "config": {...},
                                                         "topic_id": hex}
    db "meta":     b"cluster_id"                  -> utf-8 cluster id
    db "users", db "acls", db "quotas"            -> cluster/security_store.py
    db "producer_ids"                             -> cluster/producer_id_store.py

Committed consumer offsets are not here: the group coordinator keeps them in `__consumer_offsets`,
in standalone mode as in a cluster.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Protocol

import lmdb

from logbroker.cluster.lineage import SPLITS_MAX, Split, splits_from_json, splits_to_json
from logbroker.cluster.metadata import TopicSpec
from logbroker.cluster.producer_id_store import LocalProducerIdStore
from logbroker.cluster.security_store import LocalSecurityStore
from logbroker.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError

METADATA_DIR_NAME = "__cluster_metadata"
_MAP_BYTES = 64 << 20


class MetadataStore(Protocol):
    """What a broker needs from cluster metadata (ZooKeeper in a cluster, LMDB standalone)."""

    @property
    def cluster_id(self) -> str: ...

    def list_topics(self) -> dict[str, TopicSpec]: ...

    def get_topic(self, name: str) -> TopicSpec | None: ...

    def create_topic(self, spec: TopicSpec) -> None: ...

    def delete_topic(self, name: str) -> None: ...

    def set_assignment(self, name: str, assignment: dict[int, list[int]]) -> None: ...

    def close(self) -> None: ...


def _spec_to_json(spec: TopicSpec) -> bytes:
    return json.dumps(
        {
            "assignment": {str(p): r for p, r in sorted(spec.assignment.items())},
            "config": spec.config,
            "topic_id": spec.topic_id,
            "splits": splits_to_json(spec.splits),
        }
    ).encode()


def _spec_from_json(name: str, raw: bytes) -> TopicSpec:
    d = json.loads(raw)
    return TopicSpec(
        name=name,
        assignment={int(p): list(r) for p, r in d["assignment"].items()},
        config=dict(d.get("config", {})),
        topic_id=d.get("topic_id", ""),
        splits=splits_from_json(d.get("splits")),
    )


def _assign_missing_topic_ids(txn: lmdb.Transaction, db: lmdb._Database) -> None:
    """Topics stored before topic ids existed get one, once (their logs adopt it when opened)."""
    for key, raw in list(txn.cursor(db=db)):
        spec = _spec_from_json(bytes(key).decode(), bytes(raw))
        if not spec.topic_id:
            spec.topic_id = uuid.uuid4().hex
            txn.put(key, _spec_to_json(spec), db=db)


class LocalMetadataStore:
    """MetadataStore for one standalone broker. Single-threaded use (the broker's event loop)."""

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / METADATA_DIR_NAME
        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=_MAP_BYTES, max_dbs=8, subdir=True)
        self._topics = self._env.open_db(b"topics")
        self._meta = self._env.open_db(b"meta")
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"cluster_id", db=self._meta)
            if raw is None:
                raw = uuid.uuid4().hex.encode()
                txn.put(b"cluster_id", raw, db=self._meta)
            _assign_missing_topic_ids(txn, self._topics)
        self._cluster_id = raw.decode()

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    def list_topics(self) -> dict[str, TopicSpec]:
        with self._env.begin(db=self._topics) as txn:
            return {k.decode(): _spec_from_json(k.decode(), v) for k, v in txn.cursor()}

    def get_topic(self, name: str) -> TopicSpec | None:
        with self._env.begin(db=self._topics) as txn:
            raw = txn.get(name.encode())
        return None if raw is None else _spec_from_json(name, raw)

    def create_topic(self, spec: TopicSpec) -> None:
        """Store a new topic (with a new topic id unless `spec` has one); TopicAlreadyExistsError."""
        if not spec.topic_id:
            spec.topic_id = uuid.uuid4().hex
        with self._env.begin(write=True, db=self._topics) as txn:
            if not txn.put(spec.name.encode(), _spec_to_json(spec), overwrite=False):
                raise TopicAlreadyExistsError(f"topic {spec.name!r} already exists")

    def delete_topic(self, name: str) -> None:
        with self._env.begin(write=True) as txn:
            if not txn.delete(name.encode(), db=self._topics):
                raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")

    def set_assignment(self, name: str, assignment: dict[int, list[int]], split: Split | None = None) -> None:
        """The topic's new assignment and, when it grew, the split (lineage.py), in one transaction."""
        with self._env.begin(write=True, db=self._topics) as txn:
            raw = txn.get(name.encode())
            if raw is None:
                raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
            spec = _spec_from_json(name, raw)
            spec.assignment = assignment
            if split is not None:
                spec.splits = [*spec.splits, split][-SPLITS_MAX:]
            txn.put(name.encode(), _spec_to_json(spec))

    def security(self) -> LocalSecurityStore:
        """Users and ACLs, in this environment (cluster/security_store.py)."""
        return LocalSecurityStore(self._env)

    def producer_ids(self) -> LocalProducerIdStore:
        """Idempotent producers' ids, in this environment (cluster/producer_id_store.py)."""
        return LocalProducerIdStore(self._env)

    def close(self) -> None:
        self._env.close()

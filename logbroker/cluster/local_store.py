"""The embedded metadata store of a standalone broker: the `MetadataStore` interface over local LMDB.

Layout, in `<data_dir>/__cluster_metadata/` (an LMDB environment, synced on every write: this is the
source of truth for which topics exist):

    db "topics":   topic name (utf-8)            -> JSON {"assignment": {p: [replicas]}, "config": {...},
                                                         "topic_id": hex}
    db "offsets":  group \\0 topic \\0 partition  -> JSON {"offset": int, "metadata": str}
    db "meta":     b"cluster_id"                  -> utf-8 cluster id

Committed consumer offsets live here only until consumer groups get their replicated
`__consumer_offsets` log; the interface stays the same.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Protocol

import lmdb

from logbroker.cluster.metadata import TopicSpec
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

    def commit_offsets(self, group: str, offsets: dict[tuple[str, int], tuple[int, str]]) -> None: ...

    def fetch_offsets(self, group: str) -> dict[tuple[str, int], tuple[int, str]]: ...

    def close(self) -> None: ...


def _spec_to_json(spec: TopicSpec) -> bytes:
    return json.dumps(
        {
            "assignment": {str(p): r for p, r in sorted(spec.assignment.items())},
            "config": spec.config,
            "topic_id": spec.topic_id,
        }
    ).encode()


def _spec_from_json(name: str, raw: bytes) -> TopicSpec:
    d = json.loads(raw)
    return TopicSpec(
        name=name,
        assignment={int(p): list(r) for p, r in d["assignment"].items()},
        config=dict(d.get("config", {})),
        topic_id=d.get("topic_id", ""),
    )


def _offset_key(group: str, topic: str, partition: int) -> bytes:
    return f"{group}\x00{topic}\x00{partition}".encode()


class LocalMetadataStore:
    """MetadataStore for one standalone broker. Single-threaded use (the broker's event loop)."""

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / METADATA_DIR_NAME
        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=_MAP_BYTES, max_dbs=4, subdir=True)
        self._topics = self._env.open_db(b"topics")
        self._offsets = self._env.open_db(b"offsets")
        self._meta = self._env.open_db(b"meta")
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"cluster_id", db=self._meta)
            if raw is None:
                raw = uuid.uuid4().hex.encode()
                txn.put(b"cluster_id", raw, db=self._meta)
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
        with self._env.begin(write=True, db=self._topics) as txn:
            if not txn.put(spec.name.encode(), _spec_to_json(spec), overwrite=False):
                raise TopicAlreadyExistsError(f"topic {spec.name!r} already exists")

    def delete_topic(self, name: str) -> None:
        with self._env.begin(write=True) as txn:
            if not txn.delete(name.encode(), db=self._topics):
                raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
            # drop committed offsets of the topic, whichever group made them
            doomed = []
            for key in txn.cursor(db=self._offsets).iternext(values=False):
                _, topic, _ = bytes(key).split(b"\x00")
                if topic == name.encode():
                    doomed.append(bytes(key))
            for key in doomed:
                txn.delete(key, db=self._offsets)

    def set_assignment(self, name: str, assignment: dict[int, list[int]]) -> None:
        with self._env.begin(write=True, db=self._topics) as txn:
            raw = txn.get(name.encode())
            if raw is None:
                raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
            spec = _spec_from_json(name, raw)
            spec.assignment = assignment
            txn.put(name.encode(), _spec_to_json(spec))

    def commit_offsets(self, group: str, offsets: dict[tuple[str, int], tuple[int, str]]) -> None:
        with self._env.begin(write=True, db=self._offsets) as txn:
            for (topic, partition), (offset, metadata) in offsets.items():
                txn.put(
                    _offset_key(group, topic, partition),
                    json.dumps({"offset": offset, "metadata": metadata}).encode(),
                )

    def fetch_offsets(self, group: str) -> dict[tuple[str, int], tuple[int, str]]:
        prefix = group.encode() + b"\x00"
        out: dict[tuple[str, int], tuple[int, str]] = {}
        with self._env.begin(db=self._offsets) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for key, value in cur:
                    if not key.startswith(prefix):
                        break
                    _, topic, partition = bytes(key).split(b"\x00")
                    d = json.loads(value)
                    out[(topic.decode(), int(partition))] = (int(d["offset"]), str(d.get("metadata", "")))
        return out

    def close(self) -> None:
        self._env.close()

"""Where idempotent producers' ids come from: blocks of ids handed out cluster-wide, and the id and
epoch of each named producer (`producer_name`, Kafka's transactional.id used for fencing only), in
the metadata store (ZooKeeper in a cluster, the embedded LMDB of a standalone broker). Every method
blocks; call them off the event loop.

ZooKeeper layout (under the chroot)::

    /producer_ids/block                  JSON {"next": N}: ids below N are handed out. A broker takes
                                         the block [N, N + size) by a setData conditional on the
                                         znode's version (retried on a concurrent change), as Kafka's
                                         /latest_producer_id_block, so no id is ever given twice
    /producer_ids/names/<name %-quoted>  JSON {"producer_id": p, "epoch": e}: a named producer's id and
                                         its current epoch, changed by conditional writes

LMDB layout (the `__cluster_metadata` environment): db "producer_ids", b"block" -> the same JSON,
b"name:" + name (utf-8) -> the same JSON; each change is one write transaction.

A named producer: the first InitProducerId gets a new id at epoch 0; each later one the same id at
epoch + 1 (which fences the older producer: the partition logs refuse its older epoch), until the
epoch would pass EPOCH_MAX, when a new id at epoch 0 takes over. Names: 1..PRODUCER_NAME_CHARS_MAX
characters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import lmdb
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from logbroker.errors import InvalidRequestError

PRODUCER_IDS_PATH = "/producer_ids"
BLOCK_PATH = "/producer_ids/block"
NAMES_PATH = "/producer_ids/names"
EPOCH_MAX = 32767  # producerEpoch is an int16
PRODUCER_NAME_CHARS_MAX = 249
PRODUCER_ID_MAX = (1 << 63) - 1
_CAS_ATTEMPTS = 20


class ProducerIdStore(Protocol):
    def allocate_block(self, size: int) -> int:
        """The first id of a new block of `size` ids no one else has."""
        ...

    def bump_named(self, name: str, new_id: Callable[[], int]) -> tuple[int, int]:
        """(producer id, epoch) for the named producer (module doc); `new_id` gives a fresh id."""
        ...


def check_producer_name(name: str) -> str:
    if not 1 <= len(name) <= PRODUCER_NAME_CHARS_MAX:
        raise InvalidRequestError(f"producer_name must have 1 to {PRODUCER_NAME_CHARS_MAX} characters, got {len(name)}")
    return name


def next_named(raw: bytes | None, new_id: Callable[[], int]) -> dict[str, int]:
    """The named producer's entry after one more InitProducerId (pure but for `new_id`)."""
    if raw is not None:
        d = json.loads(raw)
        if int(d["epoch"]) < EPOCH_MAX:
            return {"producer_id": int(d["producer_id"]), "epoch": int(d["epoch"]) + 1}
    return {"producer_id": new_id(), "epoch": 0}


def _block_after(raw: bytes | None, size: int) -> tuple[int, bytes]:
    start = 0 if raw is None else int(json.loads(raw)["next"])
    if start > PRODUCER_ID_MAX - size:
        raise InvalidRequestError("producer ids are exhausted")
    return start, json.dumps({"next": start + size}).encode()


class LocalProducerIdStore:
    """ProducerIdStore over the standalone broker's LMDB environment."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._db = env.open_db(b"producer_ids")

    def allocate_block(self, size: int) -> int:
        with self._env.begin(write=True, db=self._db) as txn:
            start, body = _block_after(txn.get(b"block"), size)
            txn.put(b"block", body)
        return start

    def bump_named(self, name: str, new_id: Callable[[], int]) -> tuple[int, int]:
        """Read, then write: `new_id` may take a block (a write transaction of its own). The
        broker is this store's only writer and serializes these calls (server/apis/producer_ids.py)."""
        key = b"name:" + check_producer_name(name).encode()
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(key)
            current = None if raw is None else bytes(raw)
        entry = next_named(current, new_id)
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(key, json.dumps(entry).encode())
        return entry["producer_id"], entry["epoch"]


class ZkSession(Protocol):
    @property
    def kazoo(self) -> Any: ...

    def wait(self, async_result: Any) -> Any: ...


class ZkProducerIdStore:
    """ProducerIdStore over ZooKeeper, through the broker's ZkStore session."""

    def __init__(self, zk: ZkSession) -> None:
        self._zk = zk
        zk.wait(zk.kazoo.ensure_path_async(NAMES_PATH))

    def _cas(self, path: str, change: Callable[[bytes | None], bytes]) -> None:
        """Apply `change` to the znode's data with a conditional write, retried on a concurrent one."""
        zk = self._zk
        for _ in range(_CAS_ATTEMPTS):
            try:
                raw, stat = zk.wait(zk.kazoo.get_async(path))
            except NoNodeError:
                try:
                    zk.wait(zk.kazoo.create_async(path, change(None)))
                    return
                except NodeExistsError:
                    continue
            try:
                zk.wait(zk.kazoo.set_async(path, change(raw), version=stat.version))
                return
            except (BadVersionError, NoNodeError):
                continue
        raise InvalidRequestError(f"{path}: {_CAS_ATTEMPTS} concurrent changes in a row; retry")

    def allocate_block(self, size: int) -> int:
        got: list[int] = []

        def change(raw: bytes | None) -> bytes:
            start, body = _block_after(raw, size)
            got[:] = [start]
            return body

        self._cas(BLOCK_PATH, change)
        return got[0]

    def bump_named(self, name: str, new_id: Callable[[], int]) -> tuple[int, int]:
        path = f"{NAMES_PATH}/{quote(check_producer_name(name), safe='')}"
        got: list[dict[str, int]] = []
        fresh: list[int] = []

        def change(raw: bytes | None) -> bytes:
            def once() -> int:  # a retried write reuses the id it already took
                if not fresh:
                    fresh.append(new_id())
                return fresh[0]

            got[:] = [next_named(raw, once)]
            return json.dumps(got[0]).encode()

        self._cas(path, change)
        return got[0]["producer_id"], got[0]["epoch"]

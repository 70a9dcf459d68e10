"""The LMDB indexes of one partition: `<partition dir>/index.lmdb/`.

Everything here can be rebuilt from the segment files, so the environment runs with `sync=False,
metasync=False`; `sync()` forces it to disk when the log flushes, opens or closes, and a damaged
environment is deleted and rebuilt by a full recovery scan (see `PartitionIndex.open`). The
recovery point the log checkpoints after the background flush of a rolled segment is not synced
there and then (on the event loop an LMDB sync can wait behind that very fsync): a crash before the
next sync leaves an older recovery point, which only makes recovery scan more.

Named databases and their byte layouts (all integers big-endian, so byte order is numeric order)::

    offset   key   8 bytes  u64  base offset of an indexed batch
             value 12 bytes u64  base offset of the segment holding it
                            u32  byte position of the batch in that segment file
             Sparse: the first batch of every segment, then one batch each time at least
             `index_interval_bytes` have been appended since the previous entry. A lookup takes the
             floor entry (largest key <= offset) and walks batch headers forward from there.

    time     key   16 bytes u64  base offset of the segment
                            u64  timestamp ms + 2**63 (so negative timestamps sort unsigned)
             value 8 bytes  u64  base offset of the batch holding that timestamp
             Per segment, as Kafka's time index: the key is the segment's running maximum
             timestamp, written beside an offset entry when that maximum exceeds the largest one
             indexed so far in the segment, and once more when the segment stops being active.
             So the last entry of a segment holds its largest timestamp (used by retention), and
             every batch before an entry's value has a timestamp <= the entry's timestamp (used by
             `offset_for_timestamp`: start at the floor entry, walk to the first batch >= target).

    epoch    key   4 bytes  u32  leader epoch
             value 8 bytes  u64  first offset written in that epoch
             One entry each time a batch arrives with an epoch above the latest (Kafka's
             leader-epoch-checkpoint). Small: the log keeps a copy in memory.

    meta     key   ASCII name: b"log_start_offset", b"recovery_point", b"high_watermark",
                   b"segment_bytes"
             value 8 bytes  u64
             high_watermark is Kafka's replication-offset checkpoint: it may lag the live high
             watermark (it is written on close, with the recovery point, and periodically), never
             lead it. It cannot be rebuilt from the segments: a rebuilt index has none, and the log
             then starts from its log start offset (see log.py, "High watermark").
             segment_bytes is the log's configured segment size when last checkpointed: the size to
             preallocate the active segment at when the log is reopened before its topic's config
             is known (cluster mode, before the controller's first LeaderAndIsr).

Every write the log makes for one append is one transaction (`PartitionIndex.write`).
"""

from __future__ import annotations

import logging
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb

from logbroker.errors import StorageError

log = logging.getLogger(__name__)

OFFSET_KEY = struct.Struct(">Q")
OFFSET_VALUE = struct.Struct(">QI")
TIME_KEY = struct.Struct(">QQ")
TIME_VALUE = struct.Struct(">Q")
EPOCH_KEY = struct.Struct(">I")
EPOCH_VALUE = struct.Struct(">Q")
META_VALUE = struct.Struct(">Q")

TIMESTAMP_BIAS = 1 << 63
META_LOG_START_OFFSET = b"log_start_offset"
META_RECOVERY_POINT = b"recovery_point"
META_HIGH_WATERMARK = b"high_watermark"
META_SEGMENT_BYTES = b"segment_bytes"
U64_MAX = (1 << 64) - 1

# (batch base offset, segment base offset, byte position)
OffsetEntry = tuple[int, int, int]
# (segment base offset, timestamp ms, batch base offset)
TimeEntry = tuple[int, int, int]
# (leader epoch, start offset)
EpochEntry = tuple[int, int]


class PartitionIndex:
    """Offset, time, epoch and checkpoint records of one partition, in one LMDB environment.

    Not thread-safe: owned by its `Log`, which is used from one thread at a time. No transaction
    outlives a method call.
    """

    __slots__ = ("_env", "_offset_db", "_time_db", "_epoch_db", "_meta_db", "path")

    def __init__(self, env: Any, path: Path) -> None:
        self._env = env
        self.path = path
        self._offset_db = env.open_db(b"offset")
        self._time_db = env.open_db(b"time")
        self._epoch_db = env.open_db(b"epoch")
        self._meta_db = env.open_db(b"meta")

    @classmethod
    def open(cls, path: Path, map_bytes: int) -> tuple[PartitionIndex, bool]:
        """Open (creating if missing) the environment at `path`.

        Returns (index, rebuilt): `rebuilt` is True when the environment was missing, or unreadable
        and replaced by an empty one, so the caller must rebuild every entry from the log.
        """
        existed = (path / "data.mdb").exists()
        env = None
        try:
            env = _open_env(path, map_bytes)
            index = cls(env, path)
            index.entry_counts()  # touch every database: a damaged file fails here, not later
            index.meta(META_RECOVERY_POINT)
            return index, not existed
        except (lmdb.Error, StorageError) as e:
            log.warning("index %s is unreadable (%s): deleting it, it will be rebuilt from the log", path, e)
            if env is not None:
                env.close()
        try:
            shutil.rmtree(path, ignore_errors=True)
            return cls(_open_env(path, map_bytes), path), True
        except (lmdb.Error, OSError) as e:
            raise StorageError(f"cannot create index {path}: {e}") from e

    def close(self) -> None:
        self._env.close()

    def sync(self) -> None:
        try:
            self._env.sync(True)
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: sync failed: {e}") from e

    # -- writes ---------------------------------------------------------------------------------

    def write(
        self,
        offsets: Iterable[OffsetEntry] = (),
        times: Iterable[TimeEntry] = (),
        epochs: Iterable[EpochEntry] = (),
        meta: dict[bytes, int] | None = None,
    ) -> None:
        """Add entries and checkpoints in one transaction; raises StorageError (nothing written)."""
        try:
            with self._env.begin(write=True) as txn:
                pack_ok, pack_ov = OFFSET_KEY.pack, OFFSET_VALUE.pack
                for off, seg, pos in offsets:
                    txn.put(pack_ok(off), pack_ov(seg, pos), db=self._offset_db)
                for seg, ts, off in times:
                    txn.put(TIME_KEY.pack(seg, ts + TIMESTAMP_BIAS), TIME_VALUE.pack(off), db=self._time_db)
                for epoch, start in epochs:
                    txn.put(EPOCH_KEY.pack(epoch), EPOCH_VALUE.pack(start), db=self._epoch_db)
                if meta:
                    for name, value in meta.items():
                        txn.put(name, META_VALUE.pack(value), db=self._meta_db)
        except lmdb.MapFullError as e:
            raise StorageError(f"index {self.path} is full ({e}): raise index_map_bytes") from e
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: write failed: {e}") from e

    def truncate_from(
        self, offset: int, segment_base_offset: int, epochs: list[EpochEntry], meta: dict[bytes, int]
    ) -> None:
        """Forget every entry at or past `offset`, which lies in the segment at `segment_base_offset`.

        Offset entries >= offset, time entries of later segments and those of that segment whose
        batch is >= offset; the epoch table is replaced by `epochs`. One transaction.
        """
        try:
            with self._env.begin(write=True) as txn:
                _delete_from(txn, self._offset_db, OFFSET_KEY.pack(offset))
                _delete_from(txn, self._time_db, TIME_KEY.pack(segment_base_offset + 1, 0))
                cur = txn.cursor(db=self._time_db)
                lo = TIME_KEY.pack(segment_base_offset, 0)
                found = cur.set_range(lo)
                while found:
                    key = cur.key()
                    if key[:8] != lo[:8]:
                        break
                    found = cur.delete() if TIME_VALUE.unpack(cur.value())[0] >= offset else cur.next()
                self._replace_epochs(txn, epochs)
                for name, value in meta.items():
                    txn.put(name, META_VALUE.pack(value), db=self._meta_db)
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: truncation failed: {e}") from e

    def delete_offsets(self, lo: int, hi: int) -> None:
        """Forget the offset entries with keys in [lo, hi) (a cleaned segment's, before its swap)."""
        try:
            with self._env.begin(write=True) as txn:
                cur = txn.cursor(db=self._offset_db)
                found = cur.set_range(OFFSET_KEY.pack(lo))
                while found and OFFSET_KEY.unpack(cur.key())[0] < hi:
                    found = cur.delete()
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: delete failed: {e}") from e

    def delete_before(self, offset: int, epochs: list[EpochEntry], meta: dict[bytes, int]) -> None:
        """Forget the entries of segments below `offset` (a segment base): retention. One txn."""
        try:
            with self._env.begin(write=True) as txn:
                _delete_below(txn, self._offset_db, OFFSET_KEY.pack(offset))
                _delete_below(txn, self._time_db, TIME_KEY.pack(offset, 0))
                self._replace_epochs(txn, epochs)
                for name, value in meta.items():
                    txn.put(name, META_VALUE.pack(value), db=self._meta_db)
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: delete failed: {e}") from e

    def replace_epochs(self, epochs: list[EpochEntry]) -> None:
        """Replace the whole epoch table (leader-epoch bookkeeping of a replica). One transaction."""
        try:
            with self._env.begin(write=True) as txn:
                self._replace_epochs(txn, epochs)
        except lmdb.MapFullError as e:
            raise StorageError(f"index {self.path} is full ({e}): raise index_map_bytes") from e
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: epoch write failed: {e}") from e

    def _replace_epochs(self, txn: Any, epochs: list[EpochEntry]) -> None:
        txn.drop(self._epoch_db, delete=False)
        for epoch, start in epochs:
            txn.put(EPOCH_KEY.pack(epoch), EPOCH_VALUE.pack(start), db=self._epoch_db)

    # -- reads ----------------------------------------------------------------------------------

    def floor_offset(self, offset: int) -> OffsetEntry | None:
        """The indexed batch with the largest base offset <= `offset`, or None."""
        try:
            return self._floor_offset(offset)
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: read failed: {e}") from e

    def _floor_offset(self, offset: int) -> OffsetEntry | None:
        with self._env.begin(db=self._offset_db) as txn:
            cur = txn.cursor()
            key = OFFSET_KEY.pack(offset)
            if cur.set_range(key):
                if cur.key() != key and not cur.prev():
                    return None
            elif not cur.last():
                return None
            seg, pos = OFFSET_VALUE.unpack(cur.value())
            return OFFSET_KEY.unpack(cur.key())[0], seg, pos

    def time_floor(self, segment_base_offset: int, timestamp_ms: int) -> tuple[int, int] | None:
        """(timestamp, batch offset) of the segment's entry with the largest timestamp below
        `timestamp_ms`, or None."""
        return self._time_before(segment_base_offset, TIME_KEY.pack(segment_base_offset, timestamp_ms + TIMESTAMP_BIAS))

    def segment_max_timestamp(self, segment_base_offset: int) -> tuple[int, int] | None:
        """(largest indexed timestamp, its batch offset) of a segment, or None if it has none."""
        if segment_base_offset >= U64_MAX:
            return None
        return self._time_before(segment_base_offset, TIME_KEY.pack(segment_base_offset + 1, 0))

    def _time_before(self, segment_base_offset: int, key: bytes) -> tuple[int, int] | None:
        try:
            return self._time_before_txn(segment_base_offset, key)
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: read failed: {e}") from e

    def _time_before_txn(self, segment_base_offset: int, key: bytes) -> tuple[int, int] | None:
        with self._env.begin(db=self._time_db) as txn:
            cur = txn.cursor()
            found = cur.prev() if cur.set_range(key) else cur.last()
            if not found:
                return None
            seg, biased = TIME_KEY.unpack(cur.key())
            if seg != segment_base_offset:
                return None
            return biased - TIMESTAMP_BIAS, TIME_VALUE.unpack(cur.value())[0]

    def epochs(self) -> list[EpochEntry]:
        try:
            with self._env.begin(db=self._epoch_db) as txn:
                return [(EPOCH_KEY.unpack(k)[0], EPOCH_VALUE.unpack(v)[0]) for k, v in txn.cursor()]
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: read failed: {e}") from e

    def meta(self, name: bytes) -> int | None:
        try:
            with self._env.begin(db=self._meta_db) as txn:
                value = txn.get(name)
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: read failed: {e}") from e
        return None if value is None else int(META_VALUE.unpack(value)[0])

    def entry_counts(self) -> dict[str, int]:
        """Entries per database (for tests and metrics)."""
        try:
            with self._env.begin() as txn:
                return {
                    "offset": txn.stat(self._offset_db)["entries"],
                    "time": txn.stat(self._time_db)["entries"],
                    "epoch": txn.stat(self._epoch_db)["entries"],
                }
        except lmdb.Error as e:
            raise StorageError(f"index {self.path}: read failed: {e}") from e

    def time_entries(self) -> list[TimeEntry]:
        """Every time entry in key order (for tests)."""
        with self._env.begin(db=self._time_db) as txn:
            out = []
            for k, v in txn.cursor():
                seg, biased = TIME_KEY.unpack(k)
                out.append((seg, biased - TIMESTAMP_BIAS, TIME_VALUE.unpack(v)[0]))
            return out

    def offset_entries(self) -> list[OffsetEntry]:
        """Every offset entry in key order (for tests)."""
        with self._env.begin(db=self._offset_db) as txn:
            return [(OFFSET_KEY.unpack(k)[0], *OFFSET_VALUE.unpack(v)) for k, v in txn.cursor()]


def _open_env(path: Path, map_bytes: int) -> Any:
    return lmdb.open(
        str(path),
        subdir=True,
        map_size=map_bytes,
        max_dbs=4,
        sync=False,
        metasync=False,
        readahead=False,
        meminit=False,
    )


def _delete_from(txn: Any, db: Any, key: bytes) -> None:
    cur = txn.cursor(db=db)
    found = cur.set_range(key)
    while found:
        found = cur.delete()


def _delete_below(txn: Any, db: Any, key: bytes) -> None:
    cur = txn.cursor(db=db)
    found = cur.first()
    while found and cur.key() < key:
        found = cur.delete()

"""The files of one log directory, and the file-level operations on them.

Directory ``<data dir>/<topic>-<partition>/``::

    00000000000000000000.log   closed segments (read-only, trimmed), oldest first
    00000000000000004711.log   the active segment (preallocated, zeros past the data)
    index.lmdb/                offset, time, epoch and checkpoint records (see index.py)
    .clean_shutdown            present only while the log is closed after a clean `close()`
    partition.metadata         the topic id the log belongs to (see log_identity.py)
    00000000000000004711.producers  idempotent producers' state at a roll (producer_snapshot.py)

Invariants: a segment's file name is the offset of its first batch (segment.file_name); the
clean-shutdown marker is written (atomically) only after everything else of a close reached the
disk, and removed (and the removal synced) before an opened log changes anything; a directory is
deleted by renaming it to `<name>.<uuid>-delete` first, so a crash midway leaves a name the log
manager removes rather than reloads.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import uuid
from pathlib import Path

from logbroker.errors import StorageError
from logbroker.storage import segment as segment_file
from logbroker.storage.atomic_file import fsync_dir, write_atomically  # noqa: F401 (re-exported)
from logbroker.storage.log_identity import IDENTITY_FILES
from logbroker.storage.producer_snapshot import is_snapshot_file

log = logging.getLogger(__name__)

CLEAN_SHUTDOWN_FILE = ".clean_shutdown"
INDEX_DIR = "index.lmdb"
DELETE_SUFFIX = "-delete"


def list_segments(directory: Path, warn: bool = True) -> list[int]:
    """Base offsets of the segment files in `directory`, ascending (stray files are logged)."""
    bases = []
    for entry in os.scandir(directory):
        base = segment_file.parse_file_name(entry.name)
        if base is not None and entry.is_file(follow_symlinks=False):
            bases.append(base)
        elif (warn and entry.name not in (INDEX_DIR, CLEAN_SHUTDOWN_FILE, *IDENTITY_FILES)
              and not is_snapshot_file(entry.name)):
            log.warning("%s: ignoring stray file %s", directory, entry.name)
    bases.sort()
    return bases


def remove_log_dir(directory: Path) -> None:
    """Remove a (closed) log directory: rename it to `<name>.<uuid>-delete`, then delete that."""
    doomed = directory.with_name(f"{directory.name}.{uuid.uuid4().hex}{DELETE_SUFFIX}")
    try:
        if directory.exists():
            os.rename(directory, doomed)
            fsync_dir(directory.parent)
            shutil.rmtree(doomed)
    except OSError as e:
        raise StorageError(f"cannot delete {directory}: {e}") from e


class mapped:  # noqa: N801 - used as a function: `with mapped(path) as (buf, size)`
    """Context manager: a read-only mapping of a whole file (or b"" if it is empty), and its size."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._map: mmap.mmap | None = None

    def __enter__(self) -> tuple[mmap.mmap | bytes, int]:
        try:
            with open(self._path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    self._map = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as e:
            raise StorageError(f"cannot read {self._path}: {e}") from e
        return (self._map if self._map is not None else b""), size

    def __exit__(self, *exc: object) -> None:
        if self._map is not None:
            self._map.close()


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise StorageError(f"cannot stat {path}: {e}") from e

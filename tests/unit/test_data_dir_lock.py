"""The data directory's exclusive lock (logbroker/storage/data_dir_lock.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from logbroker.storage.data_dir_lock import LOCK_FILE, DataDirLock, DataDirLockedError


def test_lock_writes_the_pid_and_refuses_a_second_holder(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path / "data")
    first.acquire()
    try:
        assert (tmp_path / "data" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        second = DataDirLock(tmp_path / "data")
        with pytest.raises(DataDirLockedError) as info:
            second.acquire()
        message = str(info.value)
        assert str(tmp_path / "data") in message and f"pid {os.getpid()}" in message
        assert "\n" not in message
        assert not second.held
    finally:
        first.release()
    again = DataDirLock(tmp_path / "data")
    again.acquire()  # released: free again, and the file that stayed behind does not block it
    again.release()


def test_lock_of_a_dead_process_does_not_block(tmp_path: Path) -> None:
    """The lock belongs to the open file: a holder that exited (kill -9 alike) leaves a stale pid
    in the file, never a held lock."""
    code = ("import sys; from logbroker.storage.data_dir_lock import DataDirLock; "
            "DataDirLock(sys.argv[1]).acquire(); sys.exit(0)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=30,
                   cwd=Path(__file__).resolve().parents[2])
    assert (tmp_path / LOCK_FILE).read_text().strip().isdigit()
    lock = DataDirLock(tmp_path)
    lock.acquire()
    assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    lock.release()
    lock.release()  # idempotent


def test_a_broker_that_fails_to_construct_releases_the_lock(tmp_path: Path) -> None:
    from logbroker.config import BrokerConfig
    from logbroker.errors import StorageError
    from logbroker.server.broker import Broker
    from logbroker.storage.log_identity import REGISTRY_FILE

    (tmp_path / REGISTRY_FILE).mkdir()  # unreadable: the LogManager raises, after the lock is taken
    with pytest.raises(StorageError, match=REGISTRY_FILE) as failed:
        Broker(BrokerConfig(data_dir=tmp_path))
    lock = DataDirLock(tmp_path)
    lock.acquire()  # not refused: the failed broker's descriptor is closed, though its frame lives on
    lock.release()
    assert failed.traceback  # (kept alive until here on purpose)

"""Producer state snapshots (storage/producer_snapshot.py): the byte layout round-trips, and a
corrupt, truncated, oversized, hostile or foreign-version file is refused."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from logbroker.storage import producer_snapshot as ps
from logbroker.storage.producer_state import ProducerStateMap, Verdict
from logbroker.storage.record_batch import crc32c

EXPIRATION_MS = 1_000_000


def state() -> ProducerStateMap:
    s = ProducerStateMap(EXPIRATION_MS)
    s.record(7, 0, 0, 2, 0, 1, 100)
    s.record(9, 3, 2**31 - 1, 3, 2, 4, 200)  # sequence wraps
    for i in range(6):  # more than BATCHES_KEPT
        s.record(7, 0, 2 + 2 * i, 2, 5 + 2 * i, 6 + 2 * i, 300 + i)
    return s


def reseal(data: bytes) -> bytes:
    """`data` with its CRC recomputed (to reach the checks behind it)."""
    body = data[ps.CRC_START:]
    return data[:6] + struct.pack(">I", crc32c(body)) + body


def test_round_trip_keeps_every_producer_in_recording_order() -> None:
    original = state()
    offset, decoded = ps.decode(ps.encode(17, original), EXPIRATION_MS)
    assert offset == 17
    assert [pid for pid, _ in decoded.items()] == [pid for pid, _ in original.items()] == [9, 7]
    for (_, a), (_, b) in zip(decoded.items(), original.items(), strict=True):
        assert (a.epoch, a.last_timestamp_ms, a.batches) == (b.epoch, b.last_timestamp_ms, b.batches)
    assert decoded.check(7, 0, 12, 2).verdict is Verdict.DUPLICATE
    assert decoded.check(9, 3, 2, 1).verdict is Verdict.APPEND


def test_empty_state_round_trips() -> None:
    offset, decoded = ps.decode(ps.encode(0, ProducerStateMap(EXPIRATION_MS)), EXPIRATION_MS)
    assert offset == 0 and len(decoded) == 0


def test_corrupt_crc_is_refused() -> None:
    data = bytearray(ps.encode(17, state()))
    data[-1] ^= 0x01
    with pytest.raises(ps.SnapshotError, match="CRC"):
        ps.decode(bytes(data), EXPIRATION_MS)


@pytest.mark.parametrize("cut", [0, 5, ps.HEADER_BYTES - 1, ps.HEADER_BYTES + 3, -1])
def test_truncated_file_is_refused(cut: int) -> None:
    data = ps.encode(17, state())
    with pytest.raises(ps.SnapshotError):
        ps.decode(data[:cut], EXPIRATION_MS)
    with pytest.raises(ps.SnapshotError):  # even with a matching CRC
        ps.decode(reseal(data[:cut]) if len(data[:cut]) >= ps.HEADER_BYTES else data[:cut], EXPIRATION_MS)


def test_wrong_version_and_magic_are_refused() -> None:
    data = ps.encode(17, state())
    with pytest.raises(ps.SnapshotError, match="version 2"):
        ps.decode(data[:4] + struct.pack(">h", 2) + data[6:], EXPIRATION_MS)
    with pytest.raises(ps.SnapshotError, match="magic"):
        ps.decode(b"XXXX" + data[4:], EXPIRATION_MS)


@pytest.mark.parametrize("count", [-1, 3, 2**31 - 1])
def test_hostile_producer_count_is_refused(count: int) -> None:
    data = ps.encode(17, state())
    hostile = reseal(data[:18] + struct.pack(">i", count) + data[22:])
    with pytest.raises(ps.SnapshotError):
        ps.decode(hostile, EXPIRATION_MS)


def test_hostile_batch_count_and_offsets_are_refused() -> None:
    s = ProducerStateMap(EXPIRATION_MS)
    s.record(7, 0, 0, 2, 0, 1, 100)
    data = ps.encode(17, s)
    batch_count_at = ps.HEADER_BYTES + 18
    for bad in (0, 6, -1):
        hostile = reseal(data[:batch_count_at] + struct.pack(">b", bad) + data[batch_count_at + 1:])
        with pytest.raises(ps.SnapshotError, match="batch count"):
            ps.decode(hostile, EXPIRATION_MS)
    with pytest.raises(ps.SnapshotError, match="outside"):  # a batch at or past the snapshot offset
        ps.decode(ps.encode(1, s), EXPIRATION_MS)
    with pytest.raises(ps.SnapshotError, match="trailing"):
        ps.decode(reseal(data + b"\0"), EXPIRATION_MS)
    twice = data[:18] + struct.pack(">i", 2) + data[22:] + data[22:]
    with pytest.raises(ps.SnapshotError, match="twice"):
        ps.decode(reseal(twice), EXPIRATION_MS)


def test_oversized_file_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ps.write_snapshot(tmp_path, 17, state())
    monkeypatch.setattr(ps, "SNAPSHOT_BYTES_MAX", 30)
    with pytest.raises(ps.SnapshotError, match="exceeds"):
        ps.read_snapshot(tmp_path, 17, EXPIRATION_MS)


def test_files_are_named_after_the_offset_and_listed_in_order(tmp_path: Path) -> None:
    for offset in (300, 5, 42):
        ps.write_snapshot(tmp_path, offset, state() if offset > 100 else ProducerStateMap(EXPIRATION_MS))
    (tmp_path / (ps.file_name(99) + ".tmp")).write_bytes(b"torn")  # a crash mid-write
    (tmp_path / "00000000000000000005.log").write_bytes(b"")
    assert ps.file_name(5) == "00000000000000000005.producers"
    assert ps.list_snapshots(tmp_path) == [5, 42, 300]
    assert not (tmp_path / (ps.file_name(99) + ".tmp")).exists()
    assert len(ps.read_snapshot(tmp_path, 300, EXPIRATION_MS)) == 2
    ps.delete_snapshots(tmp_path, [5, 42, 1000])
    assert ps.list_snapshots(tmp_path) == [300]
    (tmp_path / ps.file_name(18)).write_bytes(ps.encode(20, state()))
    with pytest.raises(ps.SnapshotError, match="name says 18"):
        ps.read_snapshot(tmp_path, 18, EXPIRATION_MS)

"""Segment: one preallocated, memory-mapped segment file, and the batch walks over it."""

from __future__ import annotations

import errno
import gc
import os

import pytest

from logbroker.errors import CorruptMessageError, StorageError
from logbroker.storage import segment as segment_module
from logbroker.storage.record_batch import batch_crc_ok, encode_batch, parse_header
from logbroker.storage.segment import Scan, Segment, file_name, parse_file_name

CAPACITY = 16 << 10


def raw_batch(n: int = 2, ts: int = 1000, value: bytes = b"v" * 30) -> bytes:
    return encode_batch([(ts + i, None, value, None) for i in range(n)])


def append(seg: Segment, base_offset: int, *batches: bytes, epoch: int = 0, append_time_ms: int | None = None) -> int:
    """Append batches as the log does; returns the next offset."""
    payload = b"".join(batches)
    spans = []
    pos = 0
    offset = base_offset
    for b in batches:
        spans.append((pos, len(b), offset))
        pos += len(b)
        offset += parse_header(b).record_count
    seg.append(memoryview(payload), spans, epoch, append_time_ms)
    seg.size_bytes += len(payload)
    return offset


def test_file_names():
    assert file_name(0) == "00000000000000000000.log"
    assert file_name(4711) == "00000000000000004711.log"
    assert parse_file_name("00000000000000004711.log") == 4711
    for bad in ("4711.log", "00000000000000004711.index", "0000000000000000471x.log", "x.log", ".log"):
        assert parse_file_name(bad) is None


def test_create_preallocates_and_seal_trims(tmp_path):
    seg = Segment.create(tmp_path, 100, CAPACITY)
    assert seg.is_active and seg.size_bytes == 0
    assert os.path.getsize(seg.path) == CAPACITY
    assert os.stat(seg.path).st_blocks * 512 >= CAPACITY  # really allocated, not sparse
    b = raw_batch()
    assert append(seg, 100, b) == 102
    seg.seal()
    assert not seg.is_active
    assert os.path.getsize(seg.path) == len(b) == seg.size_bytes == seg.capacity_bytes
    v = seg.view(0, len(b))
    assert v.readonly
    assert parse_header(v).base_offset == 100
    seg.close()


def test_create_fails_cleanly_when_disk_is_full(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment_module.os, "posix_fallocate", no_space)
    with pytest.raises(StorageError, match="preallocate"):
        Segment.create(tmp_path, 0, CAPACITY)
    assert list(tmp_path.iterdir()) == []  # no half-made file


def test_append_stamps_offsets_epoch_and_keeps_crc(tmp_path):
    seg = Segment.create(tmp_path, 0, CAPACITY)
    b1, b2 = raw_batch(3), raw_batch(2)
    assert append(seg, 0, b1, b2, epoch=7) == 5
    h1 = parse_header(seg.view(0, len(b1)))
    h2 = parse_header(seg.view(len(b1), len(b2)))
    assert (h1.base_offset, h1.partition_leader_epoch) == (0, 7)
    assert (h2.base_offset, h2.partition_leader_epoch) == (3, 7)
    assert batch_crc_ok(seg.view(0, seg.size_bytes), 0, len(b1))
    assert batch_crc_ok(seg.view(0, seg.size_bytes), len(b1), len(b2))
    # bytes other than baseOffset and partitionLeaderEpoch are untouched
    assert bytes(seg.view(0, len(b1)))[16:] == b1[16:]
    seg.close()


def test_log_append_time_rewrites_timestamp_type_and_crc(tmp_path):
    seg = Segment.create(tmp_path, 0, CAPACITY)
    b = raw_batch(2, ts=5)
    append(seg, 0, b, append_time_ms=123456)
    h = parse_header(seg.view(0, len(b)))
    assert h.max_timestamp == 123456 and h.attributes & 0x08
    assert batch_crc_ok(seg.view(0, len(b)), 0, len(b))
    seg.close()


def test_view_outlives_seal_and_delete(tmp_path):
    """A caller holding a view across a roll or deletion neither blocks it nor crashes."""
    seg = Segment.create(tmp_path, 0, CAPACITY)
    b = raw_batch()
    append(seg, 0, b)
    held = seg.view(0, len(b))
    seg.seal()  # the writable mapping cannot be closed while `held` lives: left to the GC
    assert bytes(held)[16:] == b[16:]
    held2 = seg.view(0, len(b))
    seg.delete()
    assert not seg.path.exists()
    assert bytes(held2) == bytes(held)
    del held, held2
    gc.collect()


def test_truncate_zeroes_in_place_and_reopen_writable(tmp_path):
    seg = Segment.create(tmp_path, 0, CAPACITY)
    b1, b2 = raw_batch(), raw_batch()
    append(seg, 0, b1, b2)
    seg.seal()
    seg.reopen_writable(CAPACITY)
    assert seg.is_active and os.path.getsize(seg.path) == CAPACITY
    seg.truncate(len(b1))
    assert seg.size_bytes == len(b1)
    assert seg.buffer[len(b1) : len(b1) + len(b2)] == bytes(len(b2))
    append(seg, 2, b2)
    seg.close()
    assert os.path.getsize(seg.path) == len(b1) + len(b2)


def test_grow(tmp_path):
    seg = Segment.create(tmp_path, 0, 1024)
    big = raw_batch(40)
    assert len(big) > 1024
    seg.grow(len(big))
    append(seg, 0, big)
    assert seg.capacity_bytes == len(big)
    seg.close()
    assert os.path.getsize(seg.path) == len(big)


def test_find_and_read_end(tmp_path):
    seg = Segment.create(tmp_path, 10, CAPACITY)
    batches = [raw_batch(3), raw_batch(1), raw_batch(2)]  # offsets 10-12, 13, 14-15
    append(seg, 10, *batches)
    p1 = len(batches[0])
    p2 = p1 + len(batches[1])
    assert seg.find(10, 0) == 0
    assert seg.find(12, 0) == 0
    assert seg.find(13, 0) == p1
    assert seg.find(15, p1) == p2
    assert seg.find(16, 0) == -1
    assert seg.read_end(0, 1 << 20, 100) == (seg.size_bytes, None)
    assert seg.read_end(0, 0, 100) == (p1, None)  # always one whole batch
    assert seg.read_end(0, p2, 100) == (p2, None)
    assert seg.read_end(0, 1 << 20, 14) == (p2, None)  # base offset 14 is not below 14
    assert seg.read_end(p1, 1 << 20, 13) == (p1, None)
    seg.close()


def test_read_end_stops_before_a_corrupt_batch(tmp_path):
    seg = Segment.create(tmp_path, 0, CAPACITY)
    b1, b2 = raw_batch(), raw_batch()
    append(seg, 0, b1, b2)
    seg.buffer[len(b1) + 70] ^= 0xFF
    end, damage = seg.read_end(0, 1 << 20, 100)
    assert end == len(b1) and damage is not None and "CRC" in damage
    assert seg.read_end(len(b1), 1 << 20, 100)[0] == len(b1)
    seg.close()


def test_find_raises_on_a_bad_length(tmp_path):
    seg = Segment.create(tmp_path, 0, CAPACITY)
    b = raw_batch()
    append(seg, 0, b, b)
    seg.buffer[len(b) + 8 : len(b) + 12] = b"\x7f\xff\xff\xff"
    with pytest.raises(CorruptMessageError):
        seg.find(5, 0)
    seg.close()


# -- Scan (recovery) ------------------------------------------------------------------------------


def scanned(buf: bytes, expected: int = 0) -> tuple[list[int], Scan]:
    scan = Scan(buf, len(buf), expected)
    return [b.base_offset for b in scan], scan


def make_data(tmp_path, n: int = 3) -> tuple[bytes, list[int]]:
    seg = Segment.create(tmp_path, 0, CAPACITY)
    positions = []
    offset = 0
    for _ in range(n):
        positions.append(seg.size_bytes)
        offset = append(seg, offset, raw_batch(2), epoch=1)
    data = bytes(seg.buffer[: seg.size_bytes])
    seg.close()
    return data, positions


def test_scan_accepts_valid_data_and_a_zero_tail(tmp_path):
    data, _ = make_data(tmp_path)
    offsets, scan = scanned(data)
    assert offsets == [0, 2, 4] and scan.damage is None and scan.end_position == len(data)
    offsets, scan = scanned(data + bytes(100_000))
    assert offsets == [0, 2, 4] and scan.damage is None and scan.next_offset == 6
    offsets, scan = scanned(data + bytes(10))  # shorter than a header, all zero
    assert scan.damage is None and scan.end_position == len(data)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d, p: d[: p[1] + 30], "partial batch header"),  # torn in the header
        (lambda d, p: d[: p[2] + 70], "runs past"),  # torn in the records
        (lambda d, p: d + b"\x01" * 20, "partial batch header"),
        (lambda d, p: d + bytes(200) + b"\x01", "torn write"),  # data after a zero header
        (lambda d, p: d[: p[1] + 80] + bytes([d[p[1] + 80] ^ 1]) + d[p[1] + 81 :], "CRC"),
        (lambda d, p: d[: p[1] + 16] + b"\x01" + d[p[1] + 17 :], "magic"),
        (lambda d, p: d[: p[1]] + bytes(8) + d[p[1] + 8 :], "expected 2"),  # offset not yet patched
        (lambda d, p: d[: p[1] + 12] + b"\xff\xff\xff\xff" + d[p[1] + 16 :], "leader epoch"),
    ],
)
def test_scan_stops_at_damage(tmp_path, mutate, reason):
    data, positions = make_data(tmp_path)
    offsets, scan = scanned(mutate(data, positions))
    assert scan.damage is not None and reason in scan.damage
    kept = {len(data): 3, positions[2]: 2, positions[1]: 1}[scan.end_position]
    assert offsets == [0, 2, 4][:kept]


def test_scan_checks_continuity_from_the_expected_offset(tmp_path):
    data, _ = make_data(tmp_path)
    offsets, scan = scanned(data, expected=1)
    assert offsets == [] and scan.damage is not None and "expected 1" in scan.damage

"""`logbroker dump-log DIR`: offline, on a real partition directory written by a Log."""

from __future__ import annotations

import json
from pathlib import Path

from logbroker.cli import main
from logbroker.storage.log import Log, LogConfig
from logbroker.storage.record_batch import encode_batch

SMALL = {"segment_bytes": 4096, "index_interval_bytes": 256, "index_map_bytes": 4 << 20}


def make_log(directory: Path, batches: int = 100) -> None:
    plog = Log.open(directory, LogConfig(**SMALL))  # type: ignore[arg-type]
    for i in range(batches):
        plog.append(encode_batch([(1000 + i, b"k%d" % i, b"value-%03d" % i, None)] * 2), leader_epoch=3)
    plog.close()


def test_dump_log_lists_every_batch_with_crc_ok(tmp_path, capsys):
    make_log(tmp_path / "t-0")
    assert main(["dump-log", str(tmp_path / "t-0")]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("baseOffset:")]
    assert len(lines) == 100
    assert lines[0].startswith("baseOffset: 0 lastOffset: 1 count: 2 leaderEpoch: 3 producerId: -1 size: ")
    assert all(ln.endswith("crc: ok") for ln in lines)
    assert out.count("segment 0000") >= 2


def test_dump_log_marks_exactly_the_batch_with_a_flipped_bit(tmp_path, capsys):
    make_log(tmp_path / "t-0")
    assert main(["dump-log", str(tmp_path / "t-0"), "--format", "json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    victim = rows[7]
    seg = tmp_path / "t-0" / victim["segment"]
    with open(seg, "r+b") as f:
        f.seek(victim["position"] + victim["size"] - 4)
        byte = f.read(1)[0]
        f.seek(victim["position"] + victim["size"] - 4)
        f.write(bytes([byte ^ 0x10]))
    assert main(["dump-log", str(tmp_path / "t-0"), "--format", "json", "--records"]) == 1
    captured = capsys.readouterr()
    after = [json.loads(ln) for ln in captured.out.splitlines()]
    assert len(after) == len(rows)
    bad = [r for r in after if r["crc"] == "BAD"]
    assert [(r["segment"], r["base_offset"], r["position"]) for r in bad] == [
        (victim["segment"], victim["base_offset"], victim["position"])]
    assert bad[0]["problem"] == "CRC-32C mismatch" and bad[0]["records"] == []
    good = after[0]
    assert [r["value"] for r in good["records"]] == ["value-000", "value-000"]
    assert [r["offset"] for r in good["records"]] == [0, 1]
    assert "1 bad batches" in captured.err


def test_dump_log_refuses_a_directory_without_segments(tmp_path, capsys):
    assert main(["dump-log", str(tmp_path)]) == 1
    assert "no segment files" in capsys.readouterr().err
    assert main(["dump-log", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err

"""The committed stubs under logbroker/v1/ are exactly what proto/generate.py makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    generated = sorted(p.name for p in (tmp_path / "logbroker" / "v1").glob("*_pb2*.py*"))
    committed = sorted(p.name for p in (REPO / "logbroker" / "v1").glob("*_pb2*.py*"))
    assert generated == committed
    for name in generated:
        fresh = (tmp_path / "logbroker" / "v1" / name).read_text()
        assert fresh == (REPO / "logbroker" / "v1" / name).read_text(), f"{name} is stale: run proto/generate.py"

"""The committed stubs under logbroker/v1/ are exactly what proto/generate.py makes.

The generator is pinned exactly in the `test` extra (grpcio-tools, see pyproject.toml), so with it the
regenerated files are byte for byte the committed ones. With any other grpcio-tools (a developer's
newer one) the check is still meaningful: only the lines that name the generator's own version may
differ; every descriptor byte, message, service and method must match.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PINNED_GRPCIO_TOOLS = "1.85.1"

# Lines that record which generator made a file, not what the .proto says.
_VERSION_LINES = [
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"_runtime_version\.Domain\.PUBLIC,\n\s*\d+,\n\s*\d+,\n\s*\d+,\n\s*'[^']*',", re.M),
]


def normalize(text: str) -> str:
    for pattern in _VERSION_LINES:
        text = pattern.sub("<generator version>", text)
    return text


def test_normalize_hides_only_version_lines() -> None:
    a = "GRPC_GENERATED_VERSION = '1.85.1'\nclass ReplicaStub:\n"
    b = "GRPC_GENERATED_VERSION = '1.85.4'\nclass ReplicaStub:\n"
    assert normalize(a) == normalize(b)
    assert normalize(a) != normalize(b.replace("ReplicaStub", "OtherStub"))


def test_pinned_generator_matches_pyproject() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"grpcio-tools=={PINNED_GRPCIO_TOOLS}"' in pyproject


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    generated = sorted(p.name for p in (tmp_path / "logbroker" / "v1").glob("*_pb2*.py*"))
    committed = sorted(p.name for p in (REPO / "logbroker" / "v1").glob("*_pb2*.py*"))
    assert generated == committed
    exact = metadata.version("grpcio-tools") == PINNED_GRPCIO_TOOLS
    for name in generated:
        fresh = (tmp_path / "logbroker" / "v1" / name).read_text()
        committed_text = (REPO / "logbroker" / "v1" / name).read_text()
        if exact:
            assert fresh == committed_text, f"{name} is stale: run proto/generate.py"
        else:
            assert normalize(fresh) == normalize(committed_text), f"{name} is stale: run proto/generate.py"

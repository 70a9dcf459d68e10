"""Regenerate the committed gRPC/protobuf stubs under logbroker/v1/ from proto/logbroker/v1/*.proto.

Usage: python proto/generate.py [OUT_DIR]   (OUT_DIR defaults to the repository root)

The generator is grpcio-tools, pinned exactly in the `test` extra of pyproject.toml. The stubs are
committed; tests/unit/test_generated_stubs.py regenerates them into a temporary
directory and fails if they differ from what is committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "logbroker" / "v1").glob("*.proto"))
    (out_dir / "logbroker" / "v1").mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted((out_dir / "logbroker" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path)

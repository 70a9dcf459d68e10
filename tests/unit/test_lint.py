"""Style is part of the build: ruff and mypy must stay clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_ruff_clean():
    if shutil.which("ruff") is None and _run("ruff", "--version").returncode != 0:
        pytest.skip("ruff not installed")
    proc = _run("ruff", "check", "logbroker", "tests", "bench", "proto")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(600)
def test_mypy_clean():
    proc = _run("mypy", "logbroker")
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""The CLI end to end against a real `logbroker serve` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

pytestmark = pytest.mark.timeout(180)


def cli(broker, *args: str, stdin: bytes | None = None, check: bool = True, timeout: float = 120):
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": broker.address}
    proc = subprocess.run([sys.executable, "-m", "logbroker", *args], input=stdin, capture_output=True,
                          env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_produce_10k_lines_and_consume_from_beginning_in_order_per_key(broker):
    cli(broker, "topics", "create", "lines", "--partitions", "3")
    lines = [f"key{i % 17}:value-{i}" for i in range(10_000)]
    out = cli(broker, "produce", "lines", "--key-separator", ":", stdin=("\n".join(lines) + "\n").encode())
    assert b"produced 10000 records" in out.stderr
    out = cli(broker, "consume", "lines", "--from-beginning", "--max-messages", "10000", "--format", "json")
    got = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert len(got) == 10_000
    per_key: dict[str, list[str]] = defaultdict(list)
    partitions_of_key: dict[str, set[int]] = defaultdict(set)
    for m in got:
        per_key[m["key"]].append(m["value"])
        partitions_of_key[m["key"]].add(m["partition"])
    expected: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        k, v = line.split(":")
        expected[k].append(v)
    assert per_key == expected
    assert all(len(ps) == 1 for ps in partitions_of_key.values())
    # plain text output: exactly the values
    out = cli(broker, "consume", "lines", "--from-beginning", "--timeout", "1.5", "--partition", "0")
    values = out.stdout.decode().splitlines()
    assert values and all(v.startswith("value-") for v in values)


def test_topics_commands(broker):
    cli(broker, "topics", "create", "a", "--partitions", "2", "--config", "retention_ms=60000")
    cli(broker, "topics", "create", "b")
    assert cli(broker, "topics", "list").stdout.decode().split() == ["a", "b"]
    d = json.loads(cli(broker, "topics", "describe", "a", "--format", "json").stdout)
    assert [p["partition"] for p in d["partitions"]] == [0, 1]
    assert d["config"]["retention_ms"] == "60000"
    assert d["partitions"][0]["leader"] == 0 and d["partitions"][0]["isr"] == [0]
    cli(broker, "topics", "add-partitions", "a", "--total", "4")
    d = json.loads(cli(broker, "topics", "describe", "a", "--format", "json").stdout)
    assert len(d["partitions"]) == 4
    text = cli(broker, "topics", "describe", "a").stdout.decode()
    assert "PARTITION" in text and "LEADER" in text
    cli(broker, "topics", "delete", "b")
    assert cli(broker, "topics", "list").stdout.decode().split() == ["a"]


def test_errors_are_one_line_without_traceback(broker):
    for args in (
        ("topics", "create", "a/b"),
        ("topics", "describe", "missing"),
        ("topics", "delete", "missing"),
        ("topics", "create", "x", "--partitions", "0"),
        ("topics", "create", "y", "--config", "nonsense"),
    ):
        proc = cli(broker, *args, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1, (args, err)
        assert err.startswith("logbroker: error: "), err
        assert "Traceback" not in err and err.count("\n") == 1, err
    proc = cli(broker, "produce", "missing", stdin=b"x\n", check=False, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr.decode()
    assert "UNKNOWN_TOPIC_OR_PARTITION" in proc.stderr.decode()


def test_unreachable_broker_is_a_clear_error(tmp_path):
    from tests.conftest import free_port

    env = {**os.environ, "LOGBROKER_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    proc = subprocess.run([sys.executable, "-m", "logbroker", "topics", "list"], capture_output=True, env=env,
                          timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err and err.startswith("logbroker: error:"), err


def test_help_explains_each_command():
    proc = subprocess.run([sys.executable, "-m", "logbroker", "--help"], capture_output=True, timeout=30)
    text = proc.stdout.decode()
    for cmd in ("serve", "topics", "produce", "consume"):
        assert cmd in text
    for sub in (["serve"], ["produce"], ["consume"], ["topics", "create"]):
        proc = subprocess.run([sys.executable, "-m", "logbroker", *sub, "--help"], capture_output=True, timeout=30)
        assert proc.returncode == 0 and b"usage" in proc.stdout

"""The CLI end to end against a real `logbroker serve` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def assert_one_line_error(proc, *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "_InactiveRpcError" not in err and "debug_error_string" not in err, err
    assert err.startswith("logbroker: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_nothing_listening_and_bad_bootstrap_are_one_line_errors():
    from tests.conftest import free_port

    nobody = f"127.0.0.1:{free_port()}"
    for args, stdin in ((("produce", "t"), b"x\n"), (("topics", "create", "t"), None), (("cluster", "describe"), None),
                        (("consume", "t", "--timeout", "5"), None)):
        proc = subprocess.run([sys.executable, "-m", "logbroker", *args, "--bootstrap", nobody], input=stdin,
                              capture_output=True, timeout=60)
        assert_one_line_error(proc, nobody, "UNAVAILABLE")
    for bad in ("nonsense", "host:port", "a:1,b"):
        proc = subprocess.run([sys.executable, "-m", "logbroker", "topics", "list", "--bootstrap", bad],
                              capture_output=True, timeout=60)
        assert_one_line_error(proc, "--bootstrap", "HOST:PORT")
    proc = subprocess.run([sys.executable, "-m", "logbroker", "produce", "t"], input=b"x\n", capture_output=True,
                          env={**os.environ, "LOGBROKER_BOOTSTRAP": "nonsense"}, timeout=60)
    assert_one_line_error(proc, "'nonsense'")


def test_serve_on_a_port_in_use_names_the_address_and_does_not_claim_a_clean_stop(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        for flags in (["--listen", address], ["--data-listen", address, "--listen", "127.0.0.1:0"]):
            proc = subprocess.run([sys.executable, "-m", "logbroker", "serve", *flags, "--data-dir",
                                   str(tmp_path / "data"), "--metrics-listen", "off"], capture_output=True, timeout=60)
            err = proc.stderr.decode()
            assert proc.returncode == 1, err
            assert "Traceback" not in err and "stopped cleanly" not in err, err
            last = err.strip().splitlines()[-1]
            assert last.startswith("logbroker: error: ") and f"{address} is already in use" in last, err
            assert flags[0] in last, err  # says which flag to change


def test_consume_of_a_missing_topic_says_so_or_waits_when_asked(broker):
    proc = cli(broker, "consume", "nosuch", "--timeout", "30", check=False, timeout=60)
    assert_one_line_error(proc, "topic nosuch does not exist", "--wait-for-topic")
    cli(broker, "topics", "create", "two", "--partitions", "2")
    proc = cli(broker, "consume", "two", "--partition", "2", "--timeout", "30", check=False, timeout=60)
    assert_one_line_error(proc, "no partition 2")
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": broker.address}
    waiting = subprocess.Popen([sys.executable, "-m", "logbroker", "consume", "later", "--wait-for-topic",
                                "--from-beginning", "--max-messages", "1"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    try:
        first = waiting.stderr.readline().decode()  # blocks until it says it waits
        assert "waiting for topic later" in first
        cli(broker, "topics", "create", "later")
        cli(broker, "produce", "later", stdin=b"hello\n")
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert out.decode().splitlines() == ["hello"]
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    proc = cli(broker, "consume", "never", "--wait-for-topic", "--timeout", "1", check=False, timeout=60)
    assert proc.returncode == 1 and "was not created within 1 s" in proc.stderr.decode()


def test_reset_offsets_refuses_a_new_group_unless_asked_and_notes_clamping(broker):
    cli(broker, "topics", "create", "r", "--partitions", "2")
    cli(broker, "produce", "r", "--partition", "0", stdin=b"a\nb\nc\n")
    proc = cli(broker, "groups", "reset-offsets", "--group", "typo", "--topic", "r", "--to-earliest", check=False)
    assert_one_line_error(proc, "group typo does not exist", "--allow-new-group")
    assert json.loads(cli(broker, "groups", "list", "--format", "json").stdout) == []  # nothing created
    proc = cli(broker, "groups", "reset-offsets", "--group", "new", "--topic", "r", "--to-offset", "2",
               "--allow-new-group")
    assert [line.split()[-1] for line in proc.stdout.decode().splitlines()[1:]] == ["2", "0"]
    assert proc.stderr.decode().splitlines() == ["note: offset 2 is past the log end of r-1: set to 0"]
    proc = cli(broker, "groups", "reset-offsets", "--group", "new", "--topic", "r", "--to-offset", "99")
    assert proc.stderr.decode().splitlines() == ["note: offset 99 is past the log end of r-0: set to 3",
                                                 "note: offset 99 is past the log end of r-1: set to 0"]
    d = json.loads(cli(broker, "groups", "describe", "new", "--format", "json").stdout)
    assert [r["current_offset"] for r in d["partitions"]] == [3, 0]


def test_message_too_large_says_how_to_raise_the_limit(broker):
    cli(broker, "topics", "create", "small", "--config", "max_message_bytes=2000")
    lines = b"".join(b"%04d" % i + b"x" * 96 + b"\n" for i in range(200))  # 20 KB of small records
    out = cli(broker, "produce", "small", stdin=lines)  # batches stay under the topic's limit
    assert b"produced 200 records" in out.stderr
    proc = cli(broker, "produce", "small", stdin=b"y" * 3000 + b"\n", check=False)
    assert_one_line_error(proc, "MESSAGE_TOO_LARGE", "max_message_bytes=N", "batch_size_bytes")


def test_the_readmes_first_python_example_reads_all_it_produced(broker, tmp_path):
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme.split("## 30 seconds with the Python client", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0].replace("127.0.0.1:9092", broker.address)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              str(REPO), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stderr.decode()
    printed = proc.stdout.decode().splitlines()
    assert len(printed) == 1000 and len({tuple(line.split()[:2]) for line in printed}) == 1000


def test_repeated_sigterm_during_shutdown_still_exits_cleanly(broker_factory) -> None:
    """A supervisor that repeats SIGTERM while the broker shuts down (a test fixture did): the exit
    code stays 0, whatever phase of the shutdown each signal lands in."""
    import signal as _signal
    import subprocess as _subprocess

    broker = broker_factory()
    proc = broker.proc
    assert proc is not None
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            proc.send_signal(_signal.SIGTERM)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=0.002)  # paces the burst of signals; the loop ends when the process exits
        except _subprocess.TimeoutExpired:
            pass
    assert proc.wait(timeout=30) == 0, broker.log_text()[-2000:]

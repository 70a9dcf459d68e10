"""End-to-end encryption on a real broker (client/encryption.py): the broker's data directory never
holds the plaintext of a sealed value (while a plaintext canary in the same log is found by the same
search, so the search works); a consumer with the key reads the plaintext, one without it or with the
wrong key gets a DecryptionError per sealed record while the plaintext records still flow; a
QueueConsumer opens sealed values too; and the CLI seals and opens with --encryption-key-file.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.client.encryption import KEY_ID_HEADER, DecryptionError
from logbroker.client.queue.queue_consumer import QueueConsumer
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.timeout(120)

MARKER = b"PLAINTEXT-CARD-4111-1111"
CANARY = b"CANARY-NOT-ENCRYPTED-7731"


def _key_file(path: Path, keys: dict[str, bytes], current: str | None = None) -> Path:
    doc: dict[str, object] = {"keys": [{"id": k, "key": base64.b64encode(v).decode()} for k, v in keys.items()]}
    if current:
        doc["current"] = current
    path.write_text(json.dumps(doc))
    return path


def _data_dir_contains(data_dir: Path, needle: bytes) -> bool:
    """Whether any file under the broker's data directory holds `needle` (segments are read through
    the page cache, so records not yet fsynced are seen too)."""
    return any(f.is_file() and needle in f.read_bytes() for f in data_dir.rglob("*"))


def _read_all(bootstrap: str, topic: str, n: int, **kw) -> list:
    out: list = []
    with Consumer(bootstrap, request_timeout_ms=5000, **kw) as c:
        c.assign([(topic, 0)])
        c.seek_to_beginning()
        wait_for(lambda: out.extend(c.poll(timeout_ms=200)) or len(out) >= n, 30, f"{n} records of {topic}")
    return out


def test_the_broker_never_holds_the_plaintext_and_only_key_holders_read_it(broker, tmp_path):
    keys = _key_file(tmp_path / "keys.json", {"k1": bytes(range(32))})
    other = _key_file(tmp_path / "other.json", {"k1": bytes(range(1, 33))})  # same id, wrong key
    with Admin(broker.bootstrap) as admin:
        admin.create_topic("cards", partitions=1)
    with Producer(broker.bootstrap, encryption_key_file=keys, linger_ms=0) as p:
        for i in range(20):
            p.send("cards", MARKER + b"-%d" % i, key=b"user-%d" % i, headers={"trace": b"t%d" % i})
        p.send_many("cards", [MARKER + b"-many-%d" % i for i in range(20)]).result(timeout=15)
        p.send("cards", None, key=b"sealed-tombstone").get(timeout=15)
    with Producer(broker.bootstrap) as plain:
        plain.send("cards", CANARY).get(timeout=15)
        plain.send("cards", None, key=b"tombstone").get(timeout=15)

    assert _data_dir_contains(broker.data_dir, CANARY)  # the search finds what is there ...
    assert not _data_dir_contains(broker.data_dir, MARKER)  # ... and no sealed value's plaintext
    assert not _data_dir_contains(broker.data_dir, b"-many-")
    assert _data_dir_contains(broker.data_dir, b"user-7")  # keys stay plaintext, as documented

    expected = [MARKER + b"-%d" % i for i in range(20)] + [MARKER + b"-many-%d" % i for i in range(20)]
    got = _read_all(broker.bootstrap, "cards", 43, encryption_key_file=keys)
    assert [m.value for m in got] == [*expected, None, CANARY, None]
    assert got[40].headers == () and got[40].key == b"sealed-tombstone"
    assert got[3].headers == (("trace", b"t3"),) and got[3].key == b"user-3"  # key id header removed

    for kw in ({}, {"encryption_key_file": other}):  # no key file; the wrong key under the same id
        got = _read_all(broker.bootstrap, "cards", 43, **kw)
        errors = [m.value for m in got[:40]]
        assert all(isinstance(e, DecryptionError) for e in errors), kw
        assert [e.offset for e in errors] == list(range(40)) and errors[0].key_id == "k1"
        assert MARKER not in str(errors[0]).encode()
        assert [m.value for m in got[40:]] == [None, CANARY, None]  # the other records still flow
        assert dict(got[0].headers)[KEY_ID_HEADER] == b"k1"


def test_rotation_and_queue_consumer(broker, tmp_path):
    k1, k2 = bytes(range(32)), bytes(range(64, 96))
    old = _key_file(tmp_path / "old.json", {"k1": k1})
    both = _key_file(tmp_path / "both.json", {"k1": k1, "k2": k2})  # k2 current: the last listed
    with Admin(broker.bootstrap) as admin:
        admin.create_topic("jobs", partitions=1)
    with Producer(broker.bootstrap, encryption_key_file=old) as p:
        p.send("jobs", b"job-old").get(timeout=15)
    with Producer(broker.bootstrap, encryption_key_file=both) as p:
        p.send("jobs", b"job-new").get(timeout=15)
    assert [m.value for m in _read_all(broker.bootstrap, "jobs", 2, encryption_key_file=both)] == [
        b"job-old", b"job-new"]
    stale = _read_all(broker.bootstrap, "jobs", 2, encryption_key_file=old)  # not yet given k2
    assert stale[0].value == b"job-old" and isinstance(stale[1].value, DecryptionError)
    assert stale[1].value.key_id == "k2" and "not in the key file" in stale[1].value.reason

    got: list = []
    with QueueConsumer(broker.bootstrap, "workers", ["jobs"], auto_offset_reset="earliest",
                       encryption_key_file=both, client_id="queue-worker-1") as q:
        def take() -> bool:
            for m in q.poll(timeout_ms=200):
                got.append(m.value)
                m.ack()
            return len(got) >= 2
        wait_for(take, 30, "two queue messages")
    assert got == [b"job-old", b"job-new"]


def test_cli_produce_and_consume_with_a_key_file(broker, tmp_path):
    keys = _key_file(tmp_path / "keys.json", {"cli": bytes(range(32))})
    with Admin(broker.bootstrap) as admin:
        admin.create_topic("clitopic", partitions=1)

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "logbroker", *args, "--bootstrap", broker.bootstrap],
                              input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO)

    out = cli("produce", "clitopic", "--encryption-key-file", str(keys), stdin="secret-line-1\nsecret-line-2\n")
    assert out.returncode == 0, out.stderr
    assert not _data_dir_contains(broker.data_dir, b"secret-line")
    out = cli("consume", "clitopic", "--from-beginning", "--max-messages", "2", "--encryption-key-file", str(keys))
    assert out.returncode == 0, out.stderr
    assert "secret-line-1" in out.stdout and "secret-line-2" in out.stdout
    bad = cli("produce", "clitopic", "--encryption-key-file", str(tmp_path / "absent.json"), stdin="x\n")
    assert bad.returncode != 0 and "encryption key file" in bad.stderr and "Traceback" not in bad.stderr

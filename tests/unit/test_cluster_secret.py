"""The cluster secret (logbroker/cluster/cluster_secret.py): the file's rules, what a broker sends, and
the check every inter-broker call passes before anything in it is read."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest

from logbroker.cluster import cluster_secret as cs

SECRET = b"0123456789abcdef-cluster"


def test_the_file_is_stripped_and_bounded(tmp_path: Path):
    f = tmp_path / "secret"
    f.write_bytes(b"  " + SECRET + b"\n")
    assert cs.load_cluster_secret(f) == SECRET
    for data, message in [(b"", "is empty"), (b" \n\t\n", "is empty"), (b"short\n", "at least 16"),
                          (b"x" * (cs.SECRET_BYTES_MAX + 1), "at most 4096")]:
        f.write_bytes(data)
        with pytest.raises(cs.ClusterSecretError, match=message) as info:
            cs.load_cluster_secret(f)
        assert str(f) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(cs.ClusterSecretError, match=f"cannot read cluster secret file {tmp_path / 'missing'}: "):
        cs.load_cluster_secret(tmp_path / "missing")
    with pytest.raises(cs.ClusterSecretError, match="cannot read"):
        cs.load_cluster_secret(tmp_path)  # a directory


def test_a_broker_sends_the_secret_in_a_binary_header():
    assert cs.call_metadata(SECRET) == (("x-logbroker-cluster-secret-bin", SECRET),)
    assert cs.call_metadata(b"") == ()
    md = [("user-agent", "grpc"), (cs.CLUSTER_SECRET_HEADER, SECRET), (cs.CLUSTER_SECRET_HEADER, b"other")]
    assert cs.presented_secret(md) == SECRET
    assert cs.presented_secret([(cs.CLUSTER_SECRET_HEADER, "text")]) == b"text"
    assert cs.presented_secret([("user-agent", "grpc")]) is None and cs.presented_secret(None) is None


def test_only_the_same_secret_passes():
    assert cs.check_peer(SECRET, True, SECRET, "LeaderAndIsr") is None
    missing = cs.check_peer(SECRET, True, None, "LeaderAndIsr")
    assert missing is not None and missing.unauthenticated and "needs the cluster secret" in missing.message
    for wrong in (b"", SECRET[:-1], SECRET + b"x", b"0" * len(SECRET)):
        refusal = cs.check_peer(SECRET, True, wrong, "StopReplica")
        assert refusal is not None and not refusal.unauthenticated
        assert refusal.message == "StopReplica refused: wrong cluster secret"


def test_standalone_and_secretless_brokers_refuse_every_inter_broker_call():
    standalone = cs.check_peer(SECRET, False, SECRET, "UpdateMetadata")
    assert standalone is not None and "standalone" in standalone.message and not standalone.unauthenticated
    assert cs.check_peer(b"", False, None, "Fetch as replica 1") is not None
    no_secret = cs.check_peer(b"", True, b"", "ControlledShutdown")  # an empty secret never matches an empty one
    assert no_secret is not None and "no cluster secret" in no_secret.message


def test_the_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch):
    """The presented secret is compared with hmac.compare_digest (not ==, which stops at the first
    differing byte and so leaks the secret's prefix by timing)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(cs.hmac, "compare_digest", spy)
    assert cs.check_peer(SECRET, True, b"guess-guess-guess", "LeaderAndIsr") is not None
    assert cs.check_peer(SECRET, True, SECRET, "LeaderAndIsr") is None
    assert calls == [(b"guess-guess-guess", SECRET), (SECRET, SECRET)]

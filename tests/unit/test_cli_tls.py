"""The client TLS/SASL flags with a prefix (one set per cluster, as `logbroker mirror` has)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from logbroker.cli_tls import add_tls_arguments, sasl_from_args, tls_from_args
from logbroker.security.scram import ScramError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_tls_arguments(p, "source")
    add_tls_arguments(p, "target")
    return p


def test_each_prefix_has_its_own_tls_and_sasl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGBROKER_SASL_USER", "from-env")  # prefixed flags have no environment defaults
    monkeypatch.setenv("LOGBROKER_TLS", "1")
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    args = parser().parse_args(["--source-tls-ca", str(ca), "--source-sasl-user", "alice",
                                "--source-sasl-password-file", str(password), "--source-sasl-mechanism",
                                "SCRAM-SHA-512"])
    tls, sasl = tls_from_args(args, "source"), sasl_from_args(args, "source")
    assert tls is not None and tls.ca_file == str(ca)
    assert sasl is not None and (sasl.username, sasl.password, sasl.mechanism) == ("alice", "s3cret", "SCRAM-SHA-512")
    assert tls_from_args(args, "target") is None and sasl_from_args(args, "target") is None
    assert tls_from_args(parser().parse_args(["--target-tls"]), "target") is not None


def test_a_prefixed_user_without_a_password_file_names_the_prefixed_flags() -> None:
    args = parser().parse_args(["--target-sasl-user", "bob"])
    with pytest.raises(ScramError, match="--target-sasl-user needs --target-sasl-password-file"):
        sasl_from_args(args, "target")

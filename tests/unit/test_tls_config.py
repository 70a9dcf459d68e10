"""TLS settings: bad combinations are one clear error before anything listens or connects, naming
files but never their content (logbroker/tls.py, config.py's --tls-* settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from logbroker.config import ConfigError, broker_config_from_settings, resolve_serve_settings
from logbroker.tls import ServerTls, TlsConfig, TlsError, client_tls


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name in ("cert", "key", "ca"):
        (tmp_path / f"{name}.pem").write_text("-----BEGIN SECRET-----\nnot-to-be-printed\n")
        out[name] = str(tmp_path / f"{name}.pem")
    return out


def settings(tmp_path: Path, **flags: object) -> dict[str, object]:
    return resolve_serve_settings([], {}, {"data_dir": str(tmp_path / "d"), **flags})  # type: ignore[dict-item]


def test_no_tls_flags_is_plaintext(tmp_path: Path) -> None:
    assert broker_config_from_settings(settings(tmp_path)).tls is None


def test_tls_flags_make_the_broker_config(tmp_path: Path, files: dict[str, str]) -> None:
    cfg = broker_config_from_settings(settings(tmp_path, tls_cert=files["cert"], tls_key=files["key"],
                                               tls_client_ca=files["ca"], tls_client_auth="required"))
    assert cfg.tls == ServerTls(files["cert"], files["key"], files["ca"], "required")
    assert cfg.tls.as_client() == TlsConfig(files["ca"], files["cert"], files["key"])


@pytest.mark.parametrize("flags, message", [
    ({"tls_cert": "CERT"}, "needs both --tls-cert and --tls-key"),
    ({"tls_cert": "CERT", "tls_key": "KEY", "tls_client_auth": "required"}, "needs --tls-client-ca"),
    ({"tls_client_auth": "required"}, "need --tls-cert and --tls-key"),
    ({"metrics_tls": True}, "need --tls-cert and --tls-key"),
    ({"tls_cert": "CERT", "tls_key": "/nonexistent/key.pem"}, "TLS file not found: /nonexistent/key.pem"),
])
def test_bad_tls_settings_are_one_clear_error(tmp_path: Path, files: dict[str, str], flags: dict[str, object],
                                             message: str) -> None:
    given = {k: files["cert"] if v == "CERT" else files["key"] if v == "KEY" else v for k, v in flags.items()}
    with pytest.raises(ConfigError, match=message) as exc:
        broker_config_from_settings(settings(tmp_path, **given))
    assert "not-to-be-printed" not in str(exc.value)


def test_unknown_client_auth_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="none, requested, required"):
        settings(tmp_path, tls_client_auth="optional")


def test_client_tls_config(files: dict[str, str]) -> None:
    assert client_tls(None) is None and client_tls(False) is None
    assert client_tls(True) == TlsConfig()
    with pytest.raises(TlsError, match="needs its key"):
        TlsConfig(cert_file=files["cert"])
    with pytest.raises(TlsError, match="not found: /nope"):
        TlsConfig(ca_file="/nope")


def test_rotation_check_looks_at_most_once_per_interval(files: dict[str, str]) -> None:
    import os

    from logbroker.tls import RELOAD_INTERVAL_S, RotationCheck

    now = [100.0]
    check = RotationCheck(TlsConfig(files["ca"], files["cert"], files["key"]), monotonic=lambda: now[0])
    assert not check.rotated()
    os.utime(files["cert"], ns=(1, 1))  # a rotation: the file's mtime changes
    assert not check.rotated(), "looked again before the interval passed"
    now[0] += RELOAD_INTERVAL_S
    assert check.rotated()
    now[0] += RELOAD_INTERVAL_S
    assert not check.rotated(), "one rotation reported once"
    assert not RotationCheck(None).rotated()


def test_principal_from_a_certificates_common_name():
    from logbroker.tls import peercert_common_name, principal_from_common_name

    assert principal_from_common_name("alice") == "User:alice"
    assert principal_from_common_name(b"svc.orders") == "User:svc.orders"
    for bad in (None, "", "a,b", "x\ny", "a" * 300):
        assert principal_from_common_name(bad) is None
    cert = {"subject": ((("countryName", "NL"),), (("commonName", "alice"),))}
    assert peercert_common_name(cert) == "alice"
    assert peercert_common_name({}) is None and peercert_common_name(None) is None


def test_front_door_settings(tmp_path: Path, files: dict[str, str]) -> None:
    """--broker-principals (only where client certificates are required) and the connection limits."""
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    secret.chmod(0o600)
    tls = {"tls_cert": files["cert"], "tls_key": files["key"], "tls_client_ca": files["ca"]}
    cluster = {"zookeeper": "127.0.0.1:2181", "cluster_secret_file": str(secret)}
    for auth in ("none", "requested"):  # allowed (SCRAM clients), the secret alone proves brokers ...
        assert broker_config_from_settings(settings(tmp_path, **tls, **cluster, tls_client_auth=auth)).tls
        with pytest.raises(ConfigError, match="needs --tls-client-auth required"):  # ... so no principals
            broker_config_from_settings(settings(tmp_path, **tls, **cluster, tls_client_auth=auth,
                                                 broker_principals="User:b"))
    cfg = broker_config_from_settings(settings(tmp_path, **tls, **cluster, tls_client_auth="required",
                                               broker_principals="User:broker-0, User:broker-1",
                                               max_connections_per_ip=7, max_connection_creation_rate_per_sec=0))
    assert cfg.broker_principals == ("User:broker-0", "User:broker-1")
    assert (cfg.max_connections_per_ip, cfg.max_connection_creation_rate_per_sec) == (7, 0)
    plain = broker_config_from_settings(settings(tmp_path))
    assert (plain.broker_principals, plain.max_connections_per_ip, plain.max_connection_creation_rate_per_sec) == \
        ((), 100, 200)
    for bad, message in (({"broker_principals": "broker-0"}, "must be written User:NAME"),
                         ({"max_connections_per_ip": 0}, "must be positive"),
                         ({"max_connection_creation_rate_per_sec": -1}, "must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            broker_config_from_settings(settings(tmp_path, **bad))

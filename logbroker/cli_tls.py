"""The client commands' TLS and SASL flags: `--tls`, `--tls-ca`, `--tls-cert`, `--tls-key`, each defaulting to
its `LOGBROKER_TLS*` environment variable (LOGBROKER_TLS=1 turns TLS on; a CA or a certificate
given turns it on too). One `TlsConfig` (logbroker/tls.py) for whatever client the command makes.
`add_tls_arguments` adds the SASL flags too (`--sasl-user`, ...: one `SaslConfig`, client/sasl.py).

A command talking to two clusters (`logbroker mirror`) adds each set twice with a prefix:
`add_tls_arguments(parser, "source")` gives `--source-tls`, `--source-tls-ca`, ..., `--source-sasl-user`,
..., read back with `tls_from_args(args, "source")` / `sasl_from_args(args, "source")`. Prefixed flags
have no environment defaults (one variable cannot tell two clusters apart)."""

from __future__ import annotations

import argparse
import os

from logbroker.client.sasl import SaslConfig
from logbroker.security.scram import ScramError
from logbroker.tls import TlsConfig

TLS_ENV = "LOGBROKER_TLS"
_TRUE = frozenset({"1", "true", "yes", "on"})


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}-{name}" if prefix else f"--{name}"


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}_{name}" if prefix else name


def _env(prefix: str) -> dict[str, str]:
    return {} if prefix else dict(os.environ)


def _default(prefix: str, var: str, template: str = " (default: ${})") -> str:
    return "" if prefix else template.replace("{}", var)


def _of(prefix: str) -> str:
    return f" of the {prefix} cluster" if prefix else ""


def add_tls_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    env, of = _env(prefix), _of(prefix)
    parser.add_argument(_flag(prefix, "tls"), action="store_true", dest=_dest(prefix, "tls"),
                        default=env.get(TLS_ENV, "").strip().lower() in _TRUE,
                        help=f"connect{of} with TLS{_default(prefix, TLS_ENV)}; implied by the flags below")
    parser.add_argument(_flag(prefix, "tls-ca"), dest=_dest(prefix, "tls_ca"), default=env.get(f"{TLS_ENV}_CA", ""),
                        metavar="PATH", help=f"CA bundle the broker's certificate{of} is checked against"
                        f"{_default(prefix, TLS_ENV + '_CA')}; else the system's")
    parser.add_argument(_flag(prefix, "tls-cert"), dest=_dest(prefix, "tls_cert"),
                        default=env.get(f"{TLS_ENV}_CERT", ""), metavar="PATH",
                        help=f"client certificate for mTLS{of}{_default(prefix, TLS_ENV + '_CERT')}")
    parser.add_argument(_flag(prefix, "tls-key"), dest=_dest(prefix, "tls_key"),
                        default=env.get(f"{TLS_ENV}_KEY", ""), metavar="PATH",
                        help=f"key of {_flag(prefix, 'tls-cert')}{_default(prefix, TLS_ENV + '_KEY')}")
    add_sasl_arguments(parser, prefix)


def tls_from_args(args: argparse.Namespace, prefix: str = "") -> TlsConfig | None:
    """The command's TlsConfig, None for plaintext; raises tls.TlsError on a missing file or a
    certificate without its key."""
    ca, cert, key = (getattr(args, _dest(prefix, n), "") or "" for n in ("tls_ca", "tls_cert", "tls_key"))
    if not (getattr(args, _dest(prefix, "tls"), False) or ca or cert or key):
        return None
    return TlsConfig(ca, cert, key)


SASL_ENV = "LOGBROKER_SASL"
SASL_ENV_VARS = (f"{SASL_ENV}_USER", f"{SASL_ENV}_PASSWORD_FILE", f"{SASL_ENV}_MECHANISM")


def add_sasl_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """`--sasl-user`, `--sasl-password-file`, `--sasl-mechanism` (LOGBROKER_SASL_*): log in with SCRAM
    (client/sasl.py; needs TLS). The password only from a file: never on a command line."""
    env, of = _env(prefix), _of(prefix)
    sasl_default = "default: ${}; "
    user_default = _default(prefix, f"{SASL_ENV}_USER", sasl_default)
    file_default = _default(prefix, f"{SASL_ENV}_PASSWORD_FILE", sasl_default)
    mech_default = _default(prefix, f"{SASL_ENV}_MECHANISM", sasl_default)
    parser.add_argument(_flag(prefix, "sasl-user"), dest=_dest(prefix, "sasl_user"),
                        default=env.get(f"{SASL_ENV}_USER", ""), metavar="NAME",
                        help=f"log in{of} as this user with SCRAM ({user_default}needs TLS)")
    parser.add_argument(_flag(prefix, "sasl-password-file"), dest=_dest(prefix, "sasl_password_file"),
                        default=env.get(f"{SASL_ENV}_PASSWORD_FILE", ""), metavar="PATH",
                        help=f"file holding the password of {_flag(prefix, 'sasl-user')} ({file_default}one line)")
    parser.add_argument(_flag(prefix, "sasl-mechanism"), dest=_dest(prefix, "sasl_mechanism"),
                        default=env.get(f"{SASL_ENV}_MECHANISM", "SCRAM-SHA-256"), metavar="MECH",
                        help=f"SCRAM-SHA-256 or SCRAM-SHA-512 ({mech_default}else SCRAM-SHA-256)")


def sasl_from_args(args: argparse.Namespace, prefix: str = "") -> SaslConfig | None:
    """The command's SaslConfig, None without --sasl-user; ScramError (no secret in it) for a missing
    password file or a bad mechanism."""
    user = getattr(args, _dest(prefix, "sasl_user"), "") or ""
    if not user:
        return None
    path = getattr(args, _dest(prefix, "sasl_password_file"), "") or ""
    user_flag, file_flag = _flag(prefix, "sasl-user"), _flag(prefix, "sasl-password-file")
    if not path:
        hint = "" if prefix else " (or $LOGBROKER_SASL_PASSWORD_FILE)"
        raise ScramError(f"{user_flag} needs {file_flag}{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            password = f.read().rstrip("\r\n")
    except OSError as exc:
        raise ScramError(f"cannot read {file_flag} {path}: {exc.strerror}") from None
    try:
        return SaslConfig(user, password, getattr(args, _dest(prefix, "sasl_mechanism"), "SCRAM-SHA-256"))
    except ValueError as exc:
        raise ScramError(str(exc)) from None

"""The client commands' TLS and SASL flags: `--tls`, `--tls-ca`, `--tls-cert`, `--tls-key`, each defaulting to
its `LOGBROKER_TLS*` environment variable (LOGBROKER_TLS=1 turns TLS on; a CA or a certificate
given turns it on too). One `TlsConfig` (logbroker/tls.py) for whatever client the command makes.
`add_tls_arguments` adds the SASL flags too (`--sasl-user`, ...: one `SaslConfig`, client/sasl.py)."""

from __future__ import annotations

import argparse
import os

from logbroker.client.sasl import SaslConfig
from logbroker.security.scram import ScramError
from logbroker.tls import TlsConfig

TLS_ENV = "LOGBROKER_TLS"
_TRUE = frozenset({"1", "true", "yes", "on"})


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument("--tls", action="store_true", default=env.get(TLS_ENV, "").strip().lower() in _TRUE,
                        help=f"connect with TLS (default: ${TLS_ENV}; implied by the flags below)")
    parser.add_argument("--tls-ca", default=env.get(f"{TLS_ENV}_CA", ""), metavar="PATH",
                        help=f"CA bundle the broker's certificate is checked against (default: ${TLS_ENV}_CA, "
                        "else the system's)")
    parser.add_argument("--tls-cert", default=env.get(f"{TLS_ENV}_CERT", ""), metavar="PATH",
                        help=f"client certificate for mTLS (default: ${TLS_ENV}_CERT)")
    parser.add_argument("--tls-key", default=env.get(f"{TLS_ENV}_KEY", ""), metavar="PATH",
                        help=f"key of --tls-cert (default: ${TLS_ENV}_KEY)")
    add_sasl_arguments(parser)


def tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    """The command's TlsConfig, None for plaintext; raises tls.TlsError on a missing file or a
    certificate without its key."""
    ca, cert, key = (getattr(args, n, "") or "" for n in ("tls_ca", "tls_cert", "tls_key"))
    if not (getattr(args, "tls", False) or ca or cert or key):
        return None
    return TlsConfig(ca, cert, key)


SASL_ENV = "LOGBROKER_SASL"
SASL_ENV_VARS = (f"{SASL_ENV}_USER", f"{SASL_ENV}_PASSWORD_FILE", f"{SASL_ENV}_MECHANISM")


def add_sasl_arguments(parser: argparse.ArgumentParser) -> None:
    """`--sasl-user`, `--sasl-password-file`, `--sasl-mechanism` (LOGBROKER_SASL_*): log in with SCRAM
    (client/sasl.py; needs TLS). The password only from a file: never on a command line."""
    env = os.environ
    parser.add_argument("--sasl-user", default=env.get(f"{SASL_ENV}_USER", ""), metavar="NAME",
                        help=f"log in as this user with SCRAM (default: ${SASL_ENV}_USER; needs TLS)")
    parser.add_argument("--sasl-password-file", default=env.get(f"{SASL_ENV}_PASSWORD_FILE", ""), metavar="PATH",
                        help=f"file holding the password of --sasl-user (default: ${SASL_ENV}_PASSWORD_FILE)")
    parser.add_argument("--sasl-mechanism", default=env.get(f"{SASL_ENV}_MECHANISM", "SCRAM-SHA-256"),
                        metavar="MECH", help=f"SCRAM-SHA-256 or SCRAM-SHA-512 (default: ${SASL_ENV}_MECHANISM, "
                        "else SCRAM-SHA-256)")


def sasl_from_args(args: argparse.Namespace) -> SaslConfig | None:
    """The command's SaslConfig, None without --sasl-user; ScramError (no secret in it) for a missing
    password file or a bad mechanism."""
    user = getattr(args, "sasl_user", "") or ""
    if not user:
        return None
    path = getattr(args, "sasl_password_file", "") or ""
    if not path:
        raise ScramError("--sasl-user needs --sasl-password-file (or $LOGBROKER_SASL_PASSWORD_FILE)")
    try:
        with open(path, encoding="utf-8") as f:
            password = f.read().rstrip("\r\n")
    except OSError as exc:
        raise ScramError(f"cannot read --sasl-password-file {path}: {exc.strerror}") from None
    try:
        return SaslConfig(user, password, getattr(args, "sasl_mechanism", "SCRAM-SHA-256"))
    except ValueError as exc:
        raise ScramError(str(exc)) from None

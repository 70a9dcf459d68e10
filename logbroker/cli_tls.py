"""The client commands' TLS flags: `--tls`, `--tls-ca`, `--tls-cert`, `--tls-key`, each defaulting to
its `LOGBROKER_TLS*` environment variable (LOGBROKER_TLS=1 turns TLS on; a CA or a certificate
given turns it on too). One `TlsConfig` (logbroker/tls.py) for whatever client the command makes."""

from __future__ import annotations

import argparse
import os

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


def tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    """The command's TlsConfig, None for plaintext; raises tls.TlsError on a missing file or a
    certificate without its key."""
    ca, cert, key = (getattr(args, n, "") or "" for n in ("tls_ca", "tls_cert", "tls_key"))
    if not (getattr(args, "tls", False) or ca or cert or key):
        return None
    return TlsConfig(ca, cert, key)

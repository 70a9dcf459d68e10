"""TLS for every connection logbroker makes or accepts: one small config object per side, the
contexts and gRPC credentials built from it, certificate reloading, and telling a refused
handshake from a broker that is down.

Client side (`TlsConfig`, given to Producer, Consumer, Admin, QueueConsumer as `tls=`):
`ca_file` is the CA bundle the broker's certificate is checked against (empty: the system's);
`cert_file` and `key_file` the client certificate presented for mTLS (both or neither).

Broker side (`ServerTls`, from `--tls-cert`, `--tls-key`, `--tls-client-ca`, `--tls-client-auth`):
every listener speaks TLS; `client_auth` is `none` (no client certificate asked for), `requested`
(asked for, checked when given) or `required` (a client without a trusted, unexpired certificate
fails the handshake). The broker presents the same certificate as a client to other brokers, and
checks theirs against the client CA.

Rotation: `CertFiles` stamps the files (mtime_ns, size) and reads them again when a stamp changes.
gRPC's dynamic credentials ask it on every new handshake; the record transport's `ssl.SSLContext` is
replaced by the broker's timer (`reload`), and new handshakes switch to it.
Connections already open keep the certificate they started with. A pair that does not load (the cert
written, the key not yet) is ignored until the next change, and the old one stays in use.

A refused handshake: with TLS 1.3 the server checks the client's certificate after the client has
finished its half of the handshake, and both gRPC and asyncio then just close the connection, which
a client cannot tell from a broker going away. `probe()` tells them apart: it handshakes, sends an
HTTP/2 preface (answered by a gRPC server's SETTINGS; the record transport sends its session
tickets on its own) and waits for the first bytes: a server that accepted the client sends some, one
that refused it closes. Clients run it only after a TLS connection failed, so it costs nothing on
the healthy path; its verdict becomes `UNAUTHENTICATED`.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import grpc

CLIENT_AUTH_MODES = ("none", "requested", "required")
PROBE_TIMEOUT_S = 2.0
RELOAD_INTERVAL_S = 1.0  # how often the broker's timer looks at the files' stamps
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


class TlsError(ValueError):
    """A TLS setting that cannot be used (missing file, cert without key); names the file, never its content."""


@dataclass(frozen=True)
class TlsConfig:
    """A client's TLS settings (see the module doc)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsError("a client certificate needs its key: give both cert_file and key_file, or neither")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path and not os.path.isfile(path):
                raise TlsError(f"TLS file not found: {path}")

    def stamp(self) -> tuple[tuple[int, int], ...]:
        """The files' (mtime_ns, size): a change means a rotation (see RotatingChannels)."""
        return tuple(_stamp(p) for p in (self.ca_file, self.cert_file, self.key_file) if p)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context: the broker's certificate checked (against ca_file), ours presented."""
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file) if self.ca_file else None,
            private_key=_read(self.key_file) if self.key_file else None,
            certificate_chain=_read(self.cert_file) if self.cert_file else None,
        )


def aio_channel(address: str, options: list[tuple[str, Any]], tls: TlsConfig | None) -> grpc.aio.Channel:
    """A broker's channel to another broker: TLS when it has TLS (its files read now, so a channel
    opened after a rotation presents the new certificate), else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)


class RotationCheck:
    """Whether a broker's TLS files changed since its channels were opened, looked at most once per
    RELOAD_INTERVAL_S: its channels to other brokers are then reopened, so a reconnect presents the
    new certificate (an open connection keeps the one it was made with)."""

    def __init__(self, tls: TlsConfig | None, monotonic: Any = None) -> None:
        import time

        self._tls = tls
        self._monotonic = monotonic or time.monotonic
        self._stamp = tls.stamp() if tls is not None else ()
        self._next_check = self._monotonic() + RELOAD_INTERVAL_S

    def rotated(self) -> bool:
        if self._tls is None or self._monotonic() < self._next_check:
            return False
        self._next_check = self._monotonic() + RELOAD_INTERVAL_S
        stamp = self._tls.stamp()
        changed, self._stamp = stamp != self._stamp, stamp
        return changed


def client_tls(tls: TlsConfig | bool | None) -> TlsConfig | None:
    """What the clients' `tls=` argument means: True is TLS with the system's CAs and no certificate."""
    if tls is True:
        return TlsConfig()
    if tls is False or tls is None:
        return None
    return tls


MAX_PRINCIPAL_NAME_CHARS = 200


def principal_from_common_name(common_name: str | bytes | None) -> str | None:
    """`User:<CN>` for a verified client certificate's subject common name (the broker's only source
    of a TLS principal: the connection, never a request field); None without a usable name (no
    certificate, no CN, too long or with control characters)."""
    if common_name is None:
        return None
    name = common_name.decode("utf-8", "replace") if isinstance(common_name, bytes) else common_name
    if not name or len(name) > MAX_PRINCIPAL_NAME_CHARS or any(ord(c) < 0x20 or c == "," for c in name):
        return None
    return f"User:{name}"


def peercert_common_name(peercert: Any) -> str | None:
    """The subject CN of `ssl.SSLSocket.getpeercert()`'s dict (only set for a verified certificate)."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def certificate_common_name(path: str) -> str | None:
    """The subject CN of the first certificate in a PEM file (None: unreadable or without a CN).
    The standard library decodes a certificate file only through `ssl._ssl._test_decode_cert`
    (private, but in every CPython since 2.7); the broker reads its own certificate with it once,
    at start, for its default broker principal (server/broker_principals.py)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        return peercert_common_name(decode(path))
    except (OSError, ssl.SSLError, ValueError):
        return None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class ServerTls:
    """The broker's TLS settings (see the module doc)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""
    client_auth: str = "none"

    def __post_init__(self) -> None:
        if self.client_auth not in CLIENT_AUTH_MODES:
            raise TlsError(f"tls_client_auth must be one of {', '.join(CLIENT_AUTH_MODES)}, got {self.client_auth!r}")
        if not self.cert_file or not self.key_file:
            raise TlsError("TLS needs both --tls-cert and --tls-key")
        if self.client_auth != "none" and not self.client_ca_file:
            raise TlsError(f"--tls-client-auth {self.client_auth} needs --tls-client-ca (the CA client certificates "
                           "are checked against)")
        for path in (self.cert_file, self.key_file, self.client_ca_file):
            if path and not os.path.isfile(path):
                raise TlsError(f"TLS file not found: {path}")

    def as_client(self) -> TlsConfig:
        """What this broker uses to call other brokers: its own certificate, their CA the client CA."""
        return TlsConfig(self.client_ca_file, self.cert_file, self.key_file)


class CertFiles:
    """The broker's certificate, key and client CA, read again when their stamps change."""

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls
        self._lock = threading.Lock()  # gRPC's fetcher runs on its threads, the reload timer on the loop
        self._current: ssl.SSLContext | None = None  # the record transport's latest context

    def stamp(self) -> tuple[tuple[int, int], ...]:
        return tuple(_stamp(p) for p in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file) if p)

    # -- gRPC ----------------------------------------------------------------------------------

    def _grpc_config(self) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.tls.key_file), _read(self.tls.cert_file))],
            root_certificates=_read(self.tls.client_ca_file) if self.tls.client_ca_file else None,
        )

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Dynamic credentials: the files are looked at on every new handshake, read when changed."""
        seen = [self.stamp()]

        def fetch() -> Any:
            stamp = self.stamp()
            if stamp == seen[0]:
                return None
            with self._lock:
                try:
                    config = self._grpc_config()
                    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                        self.tls.cert_file, self.tls.key_file)  # a pair that does not match: keep the old one
                except (OSError, ssl.SSLError):
                    return None
                seen[0] = stamp
                return config

        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(), fetch, require_client_authentication=self.tls.client_auth == "required")

    # -- the record transport and /metrics ------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        if self.tls.client_ca_file:
            ctx.load_verify_locations(self.tls.client_ca_file)
        ctx.verify_mode = {"none": ssl.CERT_NONE, "requested": ssl.CERT_OPTIONAL,
                           "required": ssl.CERT_REQUIRED}[self.tls.client_auth]
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """The context a listener is created with. Each handshake moves to the latest loaded one
        (`reload`): its sni_callback runs on every ClientHello, with or without a server name, and
        sets the connection's context, so a reload replaces certificate, key and CA alike."""
        base = self._context()
        self._current = base

        def switch(sslobj: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext) -> None:
            current = self._current
            if current is not None and current is not ctx:
                sslobj.context = current

        base.sni_callback = switch
        return base

    def reload(self) -> None:
        """Load the files into a new context that the next handshakes use. Raises ssl.SSLError /
        OSError on files that do not load (a cert and key that do not match): the old one stays."""
        with self._lock:
            self._current = self._context()


# -- telling a refused handshake from a broker that is down -----------------------------------------


def probe(address: tuple[str, int], tls: TlsConfig, grpc_port: bool = True,
          timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the broker at `address` refuses this client's TLS, or None (it accepts us, or it cannot
    be reached at all, or did not answer in time: not a TLS matter). `grpc_port`: send the HTTP/2
    preface (a record-transport port is only read from: its session tickets are the answer)."""
    try:
        ctx = tls.ssl_context()
        ctx.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError) as exc:
        return f"the client's TLS files do not load: {exc}"
    try:
        raw = socket.create_connection(address, timeout=timeout_s)
    except OSError:
        return None
    with raw:
        try:
            sock = ctx.wrap_socket(raw, server_hostname=address[0])
        except ssl.SSLCertVerificationError as exc:
            return f"the broker's certificate is not trusted: {exc.verify_message}"
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return None  # closed mid-handshake: a broker stopping as much as a refusal; not a verdict
        except ssl.SSLError as exc:
            return f"the TLS handshake failed (is the broker speaking TLS?): {exc.reason or exc}"
        except OSError:
            return None  # reset, timeout (a stopped broker): not a TLS matter
        with sock:
            return refused_after_handshake(sock, grpc_port, timeout_s)


def refused_after_handshake(sock: ssl.SSLSocket, grpc_port: bool, timeout_s: float) -> str | None:
    """On a socket just past its handshake: None when the server's first bytes come (it accepted
    us), why it refused when it closes; None on a timeout. Leaves the socket blocking."""
    refused = ("the broker refused this client's certificate after the TLS handshake (none given, not "
               "signed by a CA the broker trusts, or expired)")
    try:
        if grpc_port:
            sock.sendall(_H2_PREFACE)
        if not select.select([sock], [], [], timeout_s)[0]:
            return None
        sock.setblocking(False)
        try:
            return None if sock.recv(1) else refused
        finally:
            sock.setblocking(True)
    except ssl.SSLWantReadError:
        return None  # records arrived (session tickets), no data yet: accepted
    except ssl.SSLError as exc:
        return f"{refused}: {exc.reason or exc}"
    except OSError:
        return refused

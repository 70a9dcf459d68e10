"""TLS for a record-transport connection that one thread reads while others write.

OpenSSL forbids SSL_read and SSL_write on one SSL object at the same time from two threads (and
Python's `ssl.SSLSocket` takes no lock: concurrent recv and send on one can crash or corrupt the
stream), but `WireConnection` reads in its reader thread (or the poller's) while callers write in
theirs. So the TLS state is an `ssl.SSLObject` over memory BIOs, touched only under `_lock`, and the
socket I/O happens outside it:

    recv_into:  [lock] decrypt what the incoming BIO holds ─ none? ─> raw recv (no lock) ─> [lock] feed BIO
    sendall:    [lock] encrypt into the outgoing BIO, take its bytes ─> raw sendall (no lock)

Writers are serialised by the caller (`WireConnection._write_lock`), so ciphertext leaves in the
order it was made. Bytes the reading side makes (a TLS 1.3 post-handshake answer) wait in the
outgoing BIO and leave with the next write: a reader never writes, so it never waits for a writer.

`open_tls()` does the handshake over the raw socket within a timeout and then waits for the server's
first records (its TLS 1.3 session tickets, sent only once it accepted our certificate; a server that
refused us closes instead): `TlsRefusedError` says which, with the reason.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from typing import Any

RECV_BYTES = 256 << 10  # one raw recv at most; the ciphertext then waits in the incoming BIO

REFUSED = ("the broker refused this client's certificate after the TLS handshake (none given, not signed by "
           "a CA the broker trusts, or expired)")


class TlsRefusedError(Exception):
    """The broker refused this client's TLS (its certificate, or ours); the message says which."""


class TlsSocket:
    """The socket subset WireConnection uses (recv_into, sendall, fileno, shutdown, close), over TLS."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._lock = threading.Lock()  # every call on _tls and the BIOs

    # -- opening ------------------------------------------------------------------------------

    def handshake(self) -> None:
        """The TLS handshake over the raw socket (its timeout bounds it); raises TlsRefusedError on
        a TLS failure, OSError (ssl.SSLEOFError too) when the connection broke."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._feed():
                    raise ssl.SSLEOFError("the broker closed the connection during the TLS handshake") from None
            except ssl.SSLCertVerificationError as exc:
                raise TlsRefusedError(f"the broker's certificate is not trusted: {exc.verify_message}") from None
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                raise
            except ssl.SSLError as exc:
                raise TlsRefusedError(f"the TLS handshake failed: {exc.reason or exc}") from None
        self._flush()

    def confirm(self, timeout_s: float) -> None:
        """TLS 1.3: wait (up to timeout_s) for the server's first records: none yet on a timeout is
        taken as accepted; a close is a refusal (TlsRefusedError)."""
        if self._tls.version() != "TLSv1.3":
            return
        if not select.select([self.raw], [], [], timeout_s)[0]:
            return
        try:
            fed = self._feed()
        except OSError:
            fed = False
        if not fed:
            raise TlsRefusedError(REFUSED)
        try:
            self._tls.read(1)  # processes the tickets; no application data comes unasked
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as exc:
            raise TlsRefusedError(f"{REFUSED}: {exc.reason or exc}") from None
        raise TlsRefusedError("the broker sent data before any request")

    def _feed(self) -> bool:
        """One raw recv into the incoming BIO; False on EOF."""
        data = self.raw.recv(RECV_BYTES)
        if not data:
            return False
        with self._lock:
            self._in.write(data)
        return True

    def _flush(self) -> None:
        with self._lock:
            out = self._out.read()
        if out:
            self.raw.sendall(out)

    # -- the socket interface -----------------------------------------------------------------

    def recv_into(self, view: memoryview) -> int:
        """Decrypted bytes into `view` (at least 1, blocking; as many as the TLS layer has, not one
        16 kB record per call); 0 at the end of the stream."""
        while True:
            with self._lock:
                got = 0
                try:
                    while got < len(view):
                        n: Any = self._tls.read(len(view) - got, view[got:])  # with a buffer: a count
                        got += int(n)
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    pass  # the end: what came before it first, then 0
                if got or self._in.eof:
                    return got
            data = self.raw.recv(RECV_BYTES)
            with self._lock:
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self._tls.write(data)
            out = self._out.read()
        self.raw.sendall(out)

    def buffered(self) -> bool:
        """Bytes the TLS layer holds that poll() on the descriptor cannot see."""
        with self._lock:
            return self._tls.pending() > 0 or self._in.pending > 0

    def fileno(self) -> int:
        return self.raw.fileno()

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        self.raw.close()

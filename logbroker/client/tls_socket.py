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

Once opened (`start_reading()`), a read-ahead thread receives and decrypts ahead of the reader, into
a bounded plaintext buffer (`READ_AHEAD_BYTES`; when it is full the thread stops receiving, and TCP
holds the broker back): OpenSSL decrypts with the GIL released, so a consumer decodes one fetch
response while the next one is decrypted (the consumer's fetch connections use it: see
wire_connection.py). `recv_into` then only copies out of that buffer, and `fileno()` is an eventfd
that is readable while decrypted bytes (or the end of the stream) wait, so poll(2) sees them:

    read-ahead thread:  raw recv ─> [lock] feed BIO, decrypt into plain[end:] ─> end += n, eventfd set
    recv_into:          wait for plain[start:end] ─> copy ─> start += n (all taken: eventfd cleared)

`open_tls()` does the handshake over the raw socket within a timeout and then waits for the server's
first records (its TLS 1.3 session tickets, sent only once it accepted our certificate; a server that
refused us closes instead): `TlsRefusedError` says which, with the reason.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
from typing import Any

RECV_BYTES = 256 << 10  # one raw recv at most; the ciphertext then waits in the incoming BIO
READ_AHEAD_BYTES = 2 << 20  # decrypted bytes the read-ahead thread holds at most
JOIN_TIMEOUT_S = 2.0  # close() waits this long at most for the read-ahead thread (woken by shutdown)

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
        self._ahead: _ReadAhead | None = None
        self._closed_by_peer = False  # the TLS stream ended (close_notify, or the connection's end)
        self._failed: ssl.SSLError | None = None  # raised by the next read (bytes before it went first)

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

    def start_reading(self) -> None:
        """From now on a read-ahead thread receives and decrypts (module doc); call once, after the
        handshake and any login that reads directly."""
        self._ahead = _ReadAhead(self)

    def recv_into(self, view: memoryview) -> int:
        """Decrypted bytes into `view` (at least 1, blocking; as many as the TLS layer has, not one
        16 kB record per call); 0 at the end of the stream."""
        if self._ahead is not None:
            return self._ahead.take(view)
        while True:
            got = self.decrypt_into(view)
            if got or self.ended:
                return got
            self.receive()

    def decrypt_into(self, view: memoryview) -> int:
        """What the incoming BIO holds, decrypted into `view` (0: nothing yet, or the end)."""
        with self._lock:
            if self._failed is not None:
                raise self._failed
            got = 0
            try:
                while got < len(view):
                    n: Any = self._tls.read(len(view) - got, view[got:])  # with a buffer: a count
                    if not n:  # the broker's close_notify (Python answers it with 0, not an error)
                        self._closed_by_peer = True
                        break
                    got += int(n)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._closed_by_peer = True  # the end: what came before it first, then 0
            except ssl.SSLError as e:  # a record that does not decrypt: what came before it first
                if not got:
                    raise
                self._failed = e
            return got

    def receive(self, into: memoryview | None = None) -> None:
        """One raw recv (blocking) into the incoming BIO; its end marks the BIO's end."""
        data = self.raw.recv(RECV_BYTES) if into is None else into[: self.raw.recv_into(into)]
        with self._lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()

    @property
    def ended(self) -> bool:
        """The incoming BIO has seen the end of the stream and holds nothing more."""
        with self._lock:
            return self._closed_by_peer or self._in.eof

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self._tls.write(data)
            out = self._out.read()
        self.raw.sendall(out)

    def buffered(self) -> bool:
        """Bytes the TLS layer holds that poll() on the descriptor cannot see."""
        if self._ahead is not None:
            return self._ahead.holds()
        with self._lock:
            return self._tls.pending() > 0 or self._in.pending > 0

    def fileno(self) -> int:
        """What poll(2) watches for input: the read-ahead's eventfd once started, else the socket."""
        return self._ahead.fileno() if self._ahead is not None else self.raw.fileno()

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)  # ends the read-ahead's recv too

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.stop()
        self.raw.close()


class _ReadAhead:
    """The read-ahead thread of a TlsSocket and its plaintext buffer (module doc). The thread only
    writes `plain[end:]`, the reader only reads `plain[start:end]`; both indexes move under `_cond`."""

    def __init__(self, sock: TlsSocket) -> None:
        self._sock = sock
        self._plain = memoryview(bytearray(READ_AHEAD_BYTES))
        self._raw = memoryview(bytearray(RECV_BYTES))
        self._start = self._end = 0
        self._cond = threading.Condition(threading.Lock())
        self._done = False  # the stream ended (or failed: _error); nothing more comes
        self._error: OSError | None = None
        self._stopping = False
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="tls-read-ahead", daemon=True)
        self._thread.start()

    # -- the reader's side --------------------------------------------------------------------

    def take(self, view: memoryview) -> int:
        """Decrypted bytes into `view` (at least 1, blocking); 0 at the end; the thread's error."""
        with self._cond:
            while self._start == self._end and not self._done:
                self._cond.wait()
            n = min(len(view), self._end - self._start)
            if n == 0:
                if self._error is not None:
                    raise self._error
                return 0
            view[:n] = self._plain[self._start : self._start + n]
            self._start += n
            if self._start == self._end:
                self._cond.notify()  # the thread may start over at the front
                if not self._done:
                    _drain(self._event_fd)
            return n

    def holds(self) -> bool:
        with self._cond:
            return self._start < self._end

    def fileno(self) -> int:
        return self._event_fd

    def stop(self) -> None:
        """End the thread (the socket is shut down first, so a recv in it returns) and its eventfd."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        try:
            self._sock.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT_S)
        if self._event_fd >= 0 and not self._thread.is_alive():
            os.close(self._event_fd)
            self._event_fd = -1

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                room = self._room()
                if room is None:
                    return
                got = self._sock.decrypt_into(room)
                if got:
                    self._publish(got)
                elif self._sock.ended:
                    self._finish(None)
                    return
                else:
                    self._sock.receive(self._raw)
        except OSError as e:  # ssl.SSLError included: a broken or tampered stream
            self._finish(e)
        except Exception as e:  # a bug: the reader must not wait for bytes that never come
            self._finish(OSError(f"TLS read-ahead failed: {e!r}"))

    def _room(self) -> memoryview | None:
        """Where to decrypt next, waiting while the buffer is full; None once stopping."""
        with self._cond:
            while self._end == len(self._plain) and self._start < self._end and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if self._start == self._end:
                self._start = self._end = 0
            return self._plain[self._end :]

    def _publish(self, n: int) -> None:
        with self._cond:
            was_empty = self._start == self._end
            self._end += n
            if was_empty:
                os.eventfd_write(self._event_fd, 1)
                self._cond.notify()

    def _finish(self, error: OSError | None) -> None:
        with self._cond:
            self._done = True
            self._error = error
            self._cond.notify_all()
            if self._event_fd >= 0:
                os.eventfd_write(self._event_fd, 1)  # stays readable: the reader sees the end


def _drain(event_fd: int) -> None:
    try:
        os.eventfd_read(event_fd)
    except BlockingIOError:
        pass

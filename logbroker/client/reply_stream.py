"""A requester's reply stream: one record-transport connection on which a broker pushes the replies
addressed to it (frame layout in logbroker/wire.py, API_REPLY_STREAM; routing on the broker in
server/reply_registry.py).

    ReplyStream(target) ──API_REPLY_STREAM──> broker
                        <──first frame: ReplyRequest(reply_to="<broker_id>:<token>")
                        <──one frame per reply (a ReplyRequest) ──> on_reply(reply), on the reader thread

The reader thread calls `on_reply` for each reply and `on_closed(reason)` once when the connection
ends (EOF, reset, a frame out of bounds, `close()`); a closed stream is not reopened here (the
requester opens a new one, with a new address).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from google.protobuf.message import DecodeError

from logbroker import wire
from logbroker.errors import BrokerUnavailableError
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

FRAME_BYTES_MAX = 64 << 20
READ_BUFFER_BYTES = 256 << 10


class ReplyStream:
    def __init__(self, target: tuple[str, int], on_reply: Callable[[pb.ReplyRequest], None],
                 on_closed: Callable[[ReplyStream, str], None], connect_timeout_s: float) -> None:
        self._on_reply = on_reply
        self._on_closed = on_closed
        self.where = f"{target[0]}:{target[1]}"
        self.closed = False
        self._lock = threading.Lock()
        try:
            self._sock = socket.create_connection(target, timeout=connect_timeout_s)
        except OSError as e:
            raise BrokerUnavailableError(f"cannot open a reply stream to {self.where}: {e}") from None
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self._file = self._sock.makefile("rb", buffering=READ_BUFFER_BYTES)
            self._sock.sendall(wire.request_header(wire.API_REPLY_STREAM, 0, 0))
            status, body = self._read_frame()
            if status != wire.STATUS_OK:
                raise BrokerUnavailableError(f"{self.where} refused a reply stream: {wire.status_code(status).name}: "
                                             f"{body.decode('utf-8', 'replace')}")
            self.reply_to = pb.ReplyRequest.FromString(body).reply_to
            self._sock.settimeout(None)
        except (OSError, DecodeError) as e:
            self._sock.close()
            raise BrokerUnavailableError(f"opening a reply stream to {self.where} failed: {e}") from None
        except BaseException:
            self._sock.close()
            raise
        self._reader = threading.Thread(target=self._read, name="logbroker-reply-stream", daemon=True)
        self._reader.start()

    def _read_frame(self) -> tuple[int, bytes]:
        head = self._file.read(wire.HEADER_BYTES)
        if len(head) < wire.HEADER_BYTES:
            raise EOFError(f"{self.where} closed the reply stream")
        size, _corr, status = wire.RESPONSE_HEADER.unpack(head)
        if size < wire.SIZE_MIN or size > wire.SIZE_MIN + FRAME_BYTES_MAX:
            raise EOFError(f"{self.where} sent a frame of size {size}")
        body = self._file.read(size - wire.SIZE_MIN)
        if len(body) < size - wire.SIZE_MIN:
            raise EOFError(f"{self.where} closed the reply stream inside a frame")
        return status, body

    def _read(self) -> None:
        reason = "closed"
        try:
            while True:
                status, body = self._read_frame()
                if status != wire.STATUS_OK:
                    reason = f"{wire.status_code(status).name}: {body.decode('utf-8', 'replace')}"
                    break
                self._on_reply(pb.ReplyRequest.FromString(body))
        except (OSError, EOFError, ValueError, DecodeError) as e:
            reason = str(e) or type(e).__name__
        except Exception as e:  # a bug in on_reply: end loudly rather than drop replies silently
            log.exception("reply stream reader failed")
            reason = repr(e)
        self._end(reason)

    def _end(self, reason: str) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._on_closed(self, reason)

    def close(self) -> None:
        """End the stream (the reader thread then ends; on_closed is called once)."""
        self._end("closed by the client")
        self._reader.join(timeout=5)
        self._file.close()
        self._sock.close()

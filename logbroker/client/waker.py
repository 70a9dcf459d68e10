"""A `threading.Event` whose `wait` can also end when sockets become readable (poll(2)).

The consumer's poll() waits for "something happened" (a fetch or commit completed, a membership
change, close()) set by other threads, and, with the record transport read inline, for its fetch
connections to have a response to read. One select() covers both: `set()` writes a byte to a
socket pair the wait selects on beside the connections.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Selectable(Protocol):
    def fileno(self) -> int: ...


S = TypeVar("S", bound=Selectable)


class Waker:
    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._lock = threading.Lock()
        self._flag = False
        self._closed = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._lock:
            if self._flag or self._closed:
                self._flag = True
                return
            self._flag = True
            try:
                self._w.send(b"\0")
            except OSError:  # full (impossible with one byte unread) or closed: the flag still says it
                pass

    def clear(self) -> None:
        with self._lock:
            if not self._flag:
                return
            self._flag = False
            if self._closed:
                return
            try:
                while self._r.recv(64):
                    pass
            except OSError:  # BlockingIOError: drained
                pass

    def wait(self, timeout_s: float | None, also: Sequence[S] = ()) -> list[S]:
        """Until set(), one of `also` is readable, or `timeout_s` passes; the readable ones of `also`."""
        if self._flag:
            return []
        ready = [s for s in also if getattr(s, "buffered", _never)()]  # TLS bytes poll() cannot see
        if ready:
            return ready
        by_fd = {s.fileno(): s for s in also}
        by_fd.pop(-1, None)  # closed
        poller = select.poll()  # not select(): it refuses descriptors above 1023
        try:
            poller.register(self._r.fileno(), select.POLLIN)
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            events = poller.poll(None if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999)))
        except (OSError, ValueError):  # closed meanwhile: the caller looks again
            return []
        return [by_fd[fd] for fd, _ in events if fd in by_fd]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._flag = True  # waits end at once from now on
        self._w.close()
        self._r.close()


def _never() -> bool:
    return False

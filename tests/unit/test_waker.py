"""logbroker/client/waker.py: an Event whose wait also ends when sockets are readable."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from logbroker.client.waker import Waker

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def waker() -> Iterator[Waker]:
    w = Waker()
    yield w
    w.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_wait_times_out_when_nothing_happens(waker: Waker):
    assert not waker.is_set()
    t0 = time.monotonic()
    assert waker.wait(0.05) == []
    assert 0.04 <= time.monotonic() - t0 < 5
    assert waker.wait(0) == []  # a zero timeout polls


def test_set_makes_waits_return_at_once_until_cleared(waker: Waker):
    waker.set()
    assert waker.is_set()
    waker.set()  # idempotent
    for _ in range(3):
        t0 = time.monotonic()
        assert waker.wait(10) == []
        assert time.monotonic() - t0 < 1
    waker.clear()
    assert not waker.is_set()
    t0 = time.monotonic()
    assert waker.wait(0.05) == []  # the byte set() wrote was drained: the select does not fire
    assert time.monotonic() - t0 >= 0.04
    waker.clear()  # clearing a clear waker is harmless


def test_set_clear_cycles_do_not_leave_the_socket_readable(waker: Waker):
    for _ in range(100):
        waker.set()
        waker.clear()
    t0 = time.monotonic()
    assert waker.wait(0.05) == []
    assert time.monotonic() - t0 >= 0.04


def test_wait_returns_the_readable_sockets(waker: Waker, pair: tuple[socket.socket, socket.socket]):
    a, b = pair
    c, d = socket.socketpair()
    try:
        assert waker.wait(0.01, [a, c]) == []
        b.send(b"x")
        t0 = time.monotonic()
        assert waker.wait(10, [a, c]) == [a]
        assert time.monotonic() - t0 < 1
        d.send(b"y")
        assert sorted(waker.wait(10, [a, c]), key=id) == sorted([a, c], key=id)
        assert not waker.is_set()  # readable sockets do not set the flag
    finally:
        c.close()
        d.close()


def test_a_set_waker_returns_before_looking_at_the_sockets(waker: Waker, pair: tuple[socket.socket, socket.socket]):
    a, b = pair
    b.send(b"x")
    waker.set()
    assert waker.wait(10, [a]) == []  # the flag first: the caller looks at everything anyway


def test_closed_sockets_in_also_are_skipped(waker: Waker):
    a, b = socket.socketpair()
    a.close()
    b.close()
    t0 = time.monotonic()
    assert waker.wait(0.05, [a]) == []  # fileno() -1: not selected on, no error
    assert time.monotonic() - t0 < 5


def test_set_from_another_thread_wakes_a_blocked_wait(waker: Waker, pair: tuple[socket.socket, socket.socket]):
    a, _ = pair
    entered = threading.Event()
    result: list[object] = []

    def waiter() -> None:
        entered.set()
        result.append(waker.wait(20, [a]))
        result.append(time.monotonic())

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert entered.wait(5)
    time.sleep(0.05)  # not synchronisation: gives the waiter time to be inside select() (either way it must wake)
    t0 = time.monotonic()
    waker.set()
    t.join(10)
    assert not t.is_alive(), "set() did not wake the wait"
    assert result[0] == []
    assert result[1] - t0 < 5  # type: ignore[operator]


def test_close_makes_waits_return_at_once():
    w = Waker()
    entered = threading.Event()
    done = threading.Event()

    def waiter() -> None:
        entered.set()
        w.wait(20)
        done.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert entered.wait(5)
    w.close()
    assert done.wait(10), "close() did not end a blocked wait"
    t0 = time.monotonic()
    assert w.wait(20) == []
    assert w.wait(None) == []
    assert time.monotonic() - t0 < 1
    w.set()  # after close: no error
    w.clear()
    t0 = time.monotonic()
    assert w.wait(20) == []  # even cleared, a closed waker does not block
    assert time.monotonic() - t0 < 1

"""Delayed operations keyed by partition: a long-polling Fetch or an acks=all Produce parks a
future here instead of a thread, and a notification of any of its partitions wakes it (an append or
a high-watermark move for fetches, a high-watermark, ISR or leadership change for produces: the
replica manager keeps one purgatory for each kind).

Single-threaded: owned by the broker's event loop. Bounded: at most `watchers_max` operations wait;
beyond that `wait` returns at once (the caller answers with what it has).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

Key = tuple[str, int]


class Purgatory:
    def __init__(self, watchers_max: int = 100_000) -> None:
        self._waiters: dict[Key, set[asyncio.Future[bool]]] = {}
        self._on_notify: dict[asyncio.Future[bool], Callable[[], None]] = {}  # watch(on_notify=...)
        self._count = 0
        self._watchers_max = watchers_max

    @property
    def waiting(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        """No further operation can wait (a long-poll fetch is then refused: server/admission.py)."""
        return self._count >= self._watchers_max

    async def wait(self, keys: Iterable[Key], timeout_s: float) -> bool:
        """Wait until one of `keys` is notified or the timeout passes; True when notified.

        The future gets its outcome from `notify` (True) or a timer (False) directly, not through
        asyncio.wait_for, whose extra future costs the waiting request a loop iteration on wake-up.
        """
        if timeout_s <= 0:
            return False
        watch = self.watch(keys)
        if watch is None:
            return False
        fut, end = watch
        timer = asyncio.get_running_loop().call_later(timeout_s, _settle, fut, False)
        try:
            return await fut
        finally:
            timer.cancel()
            end()

    def watch(self, keys: Iterable[Key], on_notify: Callable[[], None] | None = None,
              ) -> tuple[asyncio.Future[bool], Callable[[], None]] | None:
        """Register a watch of `keys` now, synchronously (an append right after this call notifies
        it; `wait` registers only once its coroutine first runs): a future set True by `notify`,
        and the function that ends the watch (call it once, whatever happened). None when full.
        `on_notify` is called within `notify`, right after the future is set (a future's own
        callbacks run a loop iteration later); it must not raise (an error is logged) and may end
        this watch and start others (they hear the next notification, not this one)."""
        if self._count >= self._watchers_max:
            return None
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        watched = list(dict.fromkeys(keys))
        for key in watched:
            self._waiters.setdefault(key, set()).add(fut)
        self._count += 1
        if on_notify is not None:
            self._on_notify[fut] = on_notify

        def end() -> None:
            self._count -= 1
            self._on_notify.pop(fut, None)
            for key in watched:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        del self._waiters[key]
            if not fut.done():
                fut.cancel()

        return fut, end

    async def wait_until(self, keys: Iterable[Key], ready: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `ready()` holds, checking it now and after each notification of one of `keys`,
        for at most `timeout_s`. Returns `ready()` at the end (False on timeout or when full)."""
        watched = list(dict.fromkeys(keys))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not ready():
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self.wait(watched, remaining):
                return ready()
        return True

    def notify(self, key: Key) -> None:
        waiters = self._waiters.get(key)
        if not waiters:
            return
        hooks = self._on_notify
        if not hooks:
            for fut in waiters:
                _settle(fut, True)
            return
        for fut in list(waiters):  # a hook may end its watch and start another (on this key, too)
            if fut.done():
                continue
            fut.set_result(True)
            hook = hooks.get(fut)
            if hook is not None:
                try:
                    hook()
                except Exception:
                    log.exception("a purgatory watch's on_notify failed")

    def notify_all(self) -> None:
        for key in list(self._waiters):
            self.notify(key)


def _settle(fut: asyncio.Future[bool], notified: bool) -> None:
    if not fut.done():
        fut.set_result(notified)

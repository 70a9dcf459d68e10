"""Purgatory: a parked wait ends True on a notification of one of its keys, False at its timeout,
and leaves nothing registered either way."""

from __future__ import annotations

import asyncio

from logbroker.replication.purgatory import Purgatory


def test_notify_wakes_the_waiter_with_true_and_unregisters_it() -> None:
    async def run() -> None:
        p = Purgatory()
        waiter = asyncio.ensure_future(p.wait([("t", 0), ("t", 1), ("t", 0)], 30))
        await asyncio.sleep(0)
        assert p.waiting == 1
        p.notify(("t", 2))  # another partition: still waiting
        await asyncio.sleep(0)
        assert not waiter.done()
        p.notify(("t", 1))
        assert await asyncio.wait_for(waiter, 5) is True
        assert p.waiting == 0 and not p._waiters

    asyncio.run(run())


def test_timeout_returns_false_and_a_late_notify_is_harmless() -> None:
    async def run() -> None:
        p = Purgatory()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await p.wait([("t", 0)], 0.05) is False
        assert loop.time() - t0 >= 0.045
        assert p.waiting == 0 and not p._waiters
        p.notify(("t", 0))
        assert await p.wait([("t", 0)], 0) is False  # no wait at all

    asyncio.run(run())


def test_a_cancelled_waiter_unregisters_and_the_cap_refuses_waits() -> None:
    async def run() -> None:
        p = Purgatory(watchers_max=1)
        waiter = asyncio.ensure_future(p.wait([("t", 0)], 30))
        await asyncio.sleep(0)
        assert await p.wait([("t", 1)], 30) is False  # full: answered at once
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert p.waiting == 0 and not p._waiters
        both = [asyncio.ensure_future(p.wait([("t", 0)], 30))]
        await asyncio.sleep(0)
        p.notify_all()
        assert await asyncio.wait_for(both[0], 5) is True

    asyncio.run(run())

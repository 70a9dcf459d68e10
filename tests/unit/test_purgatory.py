"""Purgatory: a parked wait ends True on a notification of one of its keys, False at its timeout,
and leaves nothing registered either way."""

from __future__ import annotations

import asyncio
from typing import Any

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


def test_on_notify_runs_within_notify_and_a_hook_that_rearms_hears_the_next_notify_only() -> None:
    """A watch's on_notify is called inside notify() (no loop iteration in between); a hook that
    ends its watch and starts another on the same key is not called again by the same notify; a
    hook that raises is logged and the other watches are still notified; end() drops the hook."""
    from logbroker.replication.purgatory import Purgatory

    async def scenario() -> tuple[list[str], list[str], int]:
        p = Purgatory()
        calls: list[str] = []
        current: list[Any] = []

        def rearm() -> None:
            calls.append("rearm")
            current.pop()()
            w = p.watch([("t", 0)], rearm)
            assert w is not None
            current.append(w[1])

        def boom() -> None:
            calls.append("boom")
            raise RuntimeError("a bug in a hook")

        first = p.watch([("t", 0)], rearm)
        assert first is not None
        current.append(first[1])
        bad = p.watch([("t", 0)], boom)
        assert bad is not None
        p.notify(("t", 0))  # no await: the hooks have run when it returns
        within = sorted(calls)
        calls.clear()
        bad[1]()
        p.notify(("t", 0))
        after = list(calls)
        current.pop()()
        return within, after, p.waiting

    within, after, waiting = asyncio.run(scenario())
    assert within == ["boom", "rearm"]  # each once: the re-armed watch did not hear this notify
    assert after == ["rearm"]  # the ended watch's hook is gone; the re-armed one hears the next
    assert waiting == 0

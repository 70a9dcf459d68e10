"""The share coordinator's snapshot flush (group/share_coordinator.py `_mark` / `_flush`): when every
append of a flush is replicated as it lands (append_now gives a done future: the ISR is the leader
alone), the flush's future is done before `_flush` returns, so a ShareFetch waiting for its
acknowledgements' persist loses no loop turn to it; otherwise it is done once the appends are
replicated. No broker: a fake group coordinator, the flush called by hand."""

from __future__ import annotations

import asyncio
from typing import Any

from logbroker.clock import ManualClock
from logbroker.group.share_coordinator import ShareCoordinator
from logbroker.group.share_group import ShareGroup
from logbroker.group.share_partition import SharePartition
from logbroker.group.share_settings import ShareSettings


class _Config:
    session_timeout_ms = 45_000
    group_members_max = 100


class FakeGroups:
    """What the share coordinator's flush uses of the group coordinator: append_now."""

    config = _Config()

    def __init__(self, replicated_on_landing: bool) -> None:
        self.replicated_on_landing = replicated_on_landing
        self.appended: list[bytes] = []
        self.waits: list[asyncio.Future[Any]] = []
        self.share_restore: Any = None

    def append_now(self, shard: Any, group: str, batch: bytes) -> asyncio.Future[Any]:
        self.appended.append(batch)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.replicated_on_landing:
            fut.set_result(None)
        else:
            self.waits.append(fut)
        return fut


def _group(sc: ShareCoordinator) -> ShareGroup:
    g = sc._new_group("g", ShareSettings())
    g.partitions[("t", 0)] = SharePartition(ShareSettings(), 0)
    return g


def test_a_flush_replicated_as_it_lands_is_done_before_flush_returns() -> None:
    async def main() -> None:
        groups = FakeGroups(replicated_on_landing=True)
        sc = ShareCoordinator(groups, object(), ManualClock())  # type: ignore[arg-type]
        g = _group(sc)
        done = sc._mark(object(), g, {("t", 0)})  # type: ignore[arg-type]
        assert not done.done()
        sc._flush(id(g))
        assert len(groups.appended) == 1
        assert done.done() and done.exception() is None  # no task, no loop turn in between

    asyncio.run(main())


def test_a_flush_waiting_for_replication_is_done_once_replicated() -> None:
    async def main() -> None:
        groups = FakeGroups(replicated_on_landing=False)
        sc = ShareCoordinator(groups, object(), ManualClock())  # type: ignore[arg-type]
        g = _group(sc)
        done = sc._mark(object(), g, {("t", 0)})  # type: ignore[arg-type]
        sc._flush(id(g))
        assert len(groups.appended) == 1 and not done.done()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not done.done()  # not before its append is replicated
        groups.waits[0].set_result(None)
        await asyncio.wait_for(asyncio.shield(done), 5)
        assert done.exception() is None

    asyncio.run(main())

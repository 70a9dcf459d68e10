"""Reloading a broker's copy of something kept in the metadata store (ACLs: acl_cache.py; client
quotas: quota_cache.py) when the store's change counter for it moves: checked every
`poll_interval_s`, and at once after a change made through this broker (`reload()`). Subclasses
implement `load()`: read the counter, and the data only when it moved; on failure keep the last copy.
A change made through this broker is answered after `reload()`: the caller's next request sees it
(read your writes). Loads take turns (`_turn`), so an older read never overwrites a newer copy.
"""

from __future__ import annotations

import asyncio

POLL_INTERVAL_S = 1.0


class StorePoller:
    def __init__(self, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self._poll_interval_s = poll_interval_s
        self._version: int | None = None  # the change counter of the copy held; None: none loaded
        self._turn = asyncio.Lock()

    async def reload(self) -> None:
        """Load now and return once the copy is the store's (a change made through this broker)."""
        async with self._turn:
            await self.load()

    async def load(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            async with self._turn:
                await self.load()

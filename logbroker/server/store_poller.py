"""Reloading a broker's copy of something kept in the metadata store (ACLs: acl_cache.py; client
quotas: quota_cache.py) when the store's change counter for it moves: checked every
`poll_interval_s`, and at once after a change made through this broker (`changed()`). Subclasses
implement `load()`: read the counter, and the data only when it moved; on failure keep the last copy.
"""

from __future__ import annotations

import asyncio

POLL_INTERVAL_S = 1.0


class StorePoller:
    def __init__(self, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self._poll_interval_s = poll_interval_s
        self._version: int | None = None  # the change counter of the copy held; None: none loaded
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """A change went through this broker: reload now rather than at the next poll."""
        self._changed.set()

    async def load(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), self._poll_interval_s)
            except TimeoutError:
                pass
            self._changed.clear()
            await self.load()

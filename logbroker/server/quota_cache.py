"""Each broker's copy of the client quotas (security/quotas.py): loaded before the broker serves,
reloaded when the store's quota change counter moves (checked every `poll_interval_s`, and at once
after a change made through this broker), as server/acl_cache.py does for the ACLs: every broker
applies a quota change within one poll interval (1 s) of its commit. A failed reload keeps the last
quotas and is logged. Measured usage survives a reload.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from logbroker.cluster.security_store import SecurityStore
from logbroker.security.quotas import QuotaManager
from logbroker.server.store_poller import POLL_INTERVAL_S, StorePoller

log = logging.getLogger(__name__)


class QuotaCache(StorePoller):
    def __init__(self, store: Callable[[], SecurityStore], manager: QuotaManager,
                 poll_interval_s: float = POLL_INTERVAL_S) -> None:
        super().__init__(poll_interval_s)
        self._store = store
        self._manager = manager

    async def load(self) -> None:
        store = self._store()
        try:
            version = await asyncio.to_thread(store.quota_version)
            if version == self._version:
                return
            quotas = await asyncio.to_thread(store.list_quotas)
        except Exception as e:  # the store is unreachable (ZooKeeper), or holds a quota this version refuses
            log.warning("quotas not reloaded (keeping the last %d): %s", self._manager.size, e)
            return
        if self._version is not None or quotas:
            log.info("client quotas loaded: %d entities", len(quotas))
        self._manager.update(quotas)
        self._version = version


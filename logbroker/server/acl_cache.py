"""Each broker's copy of the ACLs: loaded before the broker serves, reloaded when the store's change
counter moves (checked every `poll_interval_s`, and at once after a change made through this broker).
ZooKeeper bumps the counter in the same multi-op as the change, so every broker applies an ACL change
within one poll interval (1 s) of its commit. A failed reload keeps the last snapshot and is logged;
until the first load, the hook's authorizer is empty (everyone but super users is refused).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from logbroker.cluster.security_store import SecurityStore
from logbroker.security.acl import Authorizer
from logbroker.server.authorization import AuthorizingHook
from logbroker.server.store_poller import POLL_INTERVAL_S, StorePoller

log = logging.getLogger(__name__)


class AclCache(StorePoller):
    def __init__(self, store: Callable[[], SecurityStore], hook: AuthorizingHook, super_users: tuple[str, ...],
                 poll_interval_s: float = POLL_INTERVAL_S) -> None:
        super().__init__(poll_interval_s)
        self._store = store
        self._hook = hook
        self._super_users = super_users

    async def load(self) -> None:
        """Read the ACLs if the change counter moved; on failure keep the last snapshot."""
        store = self._store()
        try:
            version = await asyncio.to_thread(store.acl_version)
            if version == self._version:
                return
            bindings = await asyncio.to_thread(store.list_acls)
            self._hook.update(Authorizer(bindings, self._super_users))
        except Exception as e:  # the store is unreachable (ZooKeeper), or holds a binding this version refuses
            log.warning("ACLs not reloaded (keeping the last %d): %s", self._hook.authorizer.size, e)
            return
        self._version = version
        log.info("ACLs loaded: %d bindings, %d super users", len(bindings), len(self._super_users))


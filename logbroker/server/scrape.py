"""Reading the broker's state for a /metrics scrape (server/metrics.py, cluster_metrics.py).

The scrape runs on prometheus-client's HTTP thread, but partition and group state belong to the
broker's event loop: a collector hands the loop a coroutine that takes its snapshot there and waits
for it at most a bounded time. A loop that is gone or does not answer in time gives None (the
collector then reports itself down instead of blocking the scrape).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def read_on_loop(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop, timeout_s: float,
                 what: str) -> T | None:
    """Run `coro` on `loop` and return its result, or None when the loop is closed, does not answer
    within `timeout_s` (the coroutine is cancelled) or the coroutine fails (logged, naming `what`)."""
    try:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:  # the loop is closed: the broker is gone
        coro.close()
        return None
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        return None
    except Exception:
        log.exception("%s failed", what)
        return None

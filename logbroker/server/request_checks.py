"""The whole-request checks the request layer makes before any partition is touched.

Each raises `RequestRejected` (server/request_context.py); per-partition problems are never raised
from here, they become an ErrorCode in that partition's result (`as_error`).
"""

from __future__ import annotations

import logging
from typing import Protocol

from logbroker.cluster.cluster_secret import check_peer
from logbroker.errors import BrokerError, UnknownServerError
from logbroker.server.request_context import RequestRejected, RequestStatus

log = logging.getLogger(__name__)

PARTITIONS_PER_REQUEST_MAX = 10_000


class ServingState(Protocol):
    """Whether the broker serves data calls yet (False while it recovers its logs, or stops)."""

    @property
    def ready(self) -> bool: ...


def check_ready(state: ServingState, message: str = "broker is recovering its logs, not serving yet") -> None:
    if not state.ready:
        raise RequestRejected(RequestStatus.UNAVAILABLE, message)


def check_count(n: int, what: str, most: int = PARTITIONS_PER_REQUEST_MAX) -> None:
    if n > most:
        raise RequestRejected(RequestStatus.INVALID_ARGUMENT, f"{n} {what} in one request; the limit is {most}")


def as_error(exc: Exception, what: str) -> BrokerError:
    """A partition's error as data: a BrokerError as is, anything else UNKNOWN_SERVER_ERROR (logged)."""
    if isinstance(exc, BrokerError):
        return exc
    log.exception("unexpected error in %s", what)
    return UnknownServerError(f"{type(exc).__name__}: {exc}")


def require_cluster_peer(secret: bytes, cluster_mode: bool, presented: bytes | None, what: str) -> None:
    """Refuse the call (UNAUTHENTICATED / PERMISSION_DENIED) unless `presented` is this cluster's
    secret (logbroker/cluster/cluster_secret.py): only brokers make inter-broker calls."""
    refusal = check_peer(secret, cluster_mode, presented, what)
    if refusal is not None:
        log.warning("refused %s: %s", what, refusal.message)
        raise RequestRejected(
            RequestStatus.UNAUTHENTICATED if refusal.unauthenticated else RequestStatus.PERMISSION_DENIED,
            refusal.message,
        )

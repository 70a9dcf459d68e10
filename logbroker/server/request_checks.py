"""The whole-request checks the request layer makes before any partition is touched.

Each raises `RequestRejected` (server/request_context.py); per-partition problems are never raised
from here, they become an ErrorCode in that partition's result (`as_error`).

Refused inter-broker calls (`require_cluster_peer`) are something any client can cause in a loop:
they are counted in `INTERBROKER_REFUSALS.total` (`logbroker_interbroker_refusals_total` in
metrics.py) and logged at most once per `REFUSAL_WARNING_INTERVAL_S` per (peer host, reason), the
line saying how many refusals it stands for (log_throttle.py). The count is per process: one
broker per `logbroker serve`.
"""

from __future__ import annotations

import logging
from typing import Protocol

from logbroker.cluster.cluster_secret import check_peer
from logbroker.errors import BrokerError, UnknownServerError
from logbroker.log_throttle import LogThrottle
from logbroker.server.request_context import RequestRejected, RequestStatus

log = logging.getLogger(__name__)

PARTITIONS_PER_REQUEST_MAX = 10_000
REFUSAL_WARNING_INTERVAL_S = 10.0
INTERBROKER_REFUSALS = LogThrottle(REFUSAL_WARNING_INTERVAL_S)  # on the event loop, as the calls


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


def require_cluster_peer(secret: bytes, cluster_mode: bool, presented: bytes | None, what: str,
                         peer: str = "", refusals: LogThrottle = INTERBROKER_REFUSALS) -> None:
    """Refuse the call (UNAUTHENTICATED / PERMISSION_DENIED) unless `presented` is this cluster's
    secret (logbroker/cluster/cluster_secret.py): only brokers make inter-broker calls. Refusals
    are counted and their WARNING rate-limited per (peer host, reason) in `refusals`."""
    refusal = check_peer(secret, cluster_mode, presented, what)
    if refusal is not None:
        reason = "no cluster secret" if refusal.unauthenticated else "not accepted"
        count = refusals.event((peer_host(peer), reason))
        if count:
            log.warning("refused %s from %s: %s (refusals of this kind from this host since the last such "
                        "warning: %d; at most one warning per %.0f s)", what, peer or "an unknown peer",
                        refusal.message, count, refusals.interval_s)
        raise RequestRejected(
            RequestStatus.UNAUTHENTICATED if refusal.unauthenticated else RequestStatus.PERMISSION_DENIED,
            refusal.message,
        )


def peer_host(peer: str) -> str:
    """A peer address without its port ('ipv4:10.0.0.7:50312' -> 'ipv4:10.0.0.7'): a client that
    reconnects is still the same peer."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer

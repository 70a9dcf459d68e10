"""How a failed call to a broker becomes a LogbrokerError, shared by every client (producer,
consumer, admin, group coordinator client): a whole-call gRPC status maps to one error; its
`retriable` and `refresh_metadata` flags (logbroker/errors.py) tell the caller whether to try again
and whether to look the leaders up first.

    UNAVAILABLE, CANCELLED  -> BrokerUnavailableError   (retriable, refresh metadata)
    DEADLINE_EXCEEDED       -> RequestTimedOutError     (retriable)
    RESOURCE_EXHAUSTED      -> BrokerOverloadedError    (retriable after its retry-after hint: the
                                                     broker's overload refusal, server/admission.py, or
                                                     gRPC's own concurrent-call limit)
                               RecordListTooLargeError  (final: without a hint, a request too large)
    PERMISSION_DENIED       -> PermissionDeniedError    (final)
    UNAUTHENTICATED         -> UnauthenticatedError     (final: a refused TLS handshake, logbroker/tls.py)
    anything else           -> UnknownServerError
"""

from __future__ import annotations

import grpc

from logbroker import wire
from logbroker.errors import (
    BrokerOverloadedError,
    BrokerUnavailableError,
    LogbrokerError,
    PermissionDeniedError,
    RecordListTooLargeError,
    RequestTimedOutError,
    UnauthenticatedError,
    UnknownServerError,
)


def rpc_error_text(e: BaseException) -> str:
    """One line for a gRPC error: its status code and details (str() of one spans 5 lines)."""
    code = getattr(e, "code", None)
    details = getattr(e, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code().name}: {details()}"
        except Exception:  # a partially built error
            pass
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def rpc_error(e: grpc.RpcError) -> LogbrokerError:
    """A whole-call gRPC failure as the error each batch (partition, commit) in it gets."""
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else rpc_error_text(e)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        # CANCELLED: the broker stopped (e.g. a controlled shutdown) with the call in flight
        return BrokerUnavailableError(f"broker unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimedOutError(f"request timed out: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint = retry_after_ms(e, details)
        if hint is not None:
            return BrokerOverloadedError(f"broker overloaded: {details}", hint)
        return RecordListTooLargeError(f"request rejected: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(f"permission denied: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UnauthenticatedError(details)
    return UnknownServerError(f"{code}: {details}")


# gRPC's server refusing a call over its maximum_concurrent_rpcs: overload too, without a hint
GRPC_CONCURRENCY_REFUSAL = "Concurrent RPC limit exceeded"
GRPC_CONCURRENCY_RETRY_AFTER_MS = 100


def retry_after_ms(e: grpc.RpcError, details: str) -> int | None:
    """An overload refusal's retry-after hint (logbroker/wire.py): the call's trailing metadata
    `retry-after-ms`, else the end of its details; None: not an overload refusal."""
    trailing = getattr(e, "trailing_metadata", None)
    try:
        for key, value in (trailing() if callable(trailing) else None) or ():
            if key == wire.RETRY_AFTER_METADATA:
                return max(0, int(value))
    except (ValueError, TypeError):  # a malformed hint: read the details instead
        pass
    hint = wire.retry_after_ms(details or "")
    if hint is None and GRPC_CONCURRENCY_REFUSAL in (details or ""):
        return GRPC_CONCURRENCY_RETRY_AFTER_MS
    return hint


def overload_wait_ms(backoff_ms: int, err: BaseException | None) -> int:
    """The wait before retrying after `err`: the backoff (with its jitter), plus an overloaded
    broker's retry-after hint, so the hint is honoured and the retries still spread out."""
    return backoff_ms + int(getattr(err, "retry_after_ms", 0) or 0)


def is_retriable(err: BaseException) -> bool:
    return bool(getattr(err, "retriable", False))


def needs_metadata(err: BaseException) -> bool:
    return bool(getattr(err, "refresh_metadata", False)) or isinstance(err, BrokerUnavailableError)

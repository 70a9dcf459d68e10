"""How a failed call to a broker becomes a LogbrokerError, shared by every client (producer,
consumer, admin, group coordinator client): a whole-call gRPC status maps to one error; its
`retriable` and `refresh_metadata` flags (logbroker/errors.py) tell the caller whether to try again
and whether to look the leaders up first.

    UNAVAILABLE, CANCELLED  -> BrokerUnavailableError   (retriable, refresh metadata)
    DEADLINE_EXCEEDED       -> RequestTimedOutError     (retriable)
    RESOURCE_EXHAUSTED      -> RecordListTooLargeError  (final)
    PERMISSION_DENIED       -> PermissionDeniedError    (final)
    UNAUTHENTICATED         -> UnauthenticatedError     (final: a refused TLS handshake, logbroker/tls.py)
    anything else           -> UnknownServerError
"""

from __future__ import annotations

import grpc

from logbroker.errors import (
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
        return RecordListTooLargeError(f"request rejected: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(f"permission denied: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UnauthenticatedError(details)
    return UnknownServerError(f"{code}: {details}")


def is_retriable(err: BaseException) -> bool:
    return bool(getattr(err, "retriable", False))


def needs_metadata(err: BaseException) -> bool:
    return bool(getattr(err, "refresh_metadata", False)) or isinstance(err, BrokerUnavailableError)

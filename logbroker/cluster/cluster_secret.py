"""The cluster secret: how brokers prove to each other that they are brokers.

Every inter-broker call (the controller's LeaderAndIsr / UpdateMetadata / StopReplica, a broker's
ControlledShutdown to the controller, a follower's OffsetForLeaderEpoch and replica Fetch) carries
the secret the brokers share in the gRPC metadata header `CLUSTER_SECRET_HEADER` (binary). The
receiver compares it in constant time (`hmac.compare_digest`) before it looks at anything else in
the request, so a plain client can neither change a replica's role nor move a controller epoch.
Until certificate identities arrive (mTLS), the secret travels in clear over plaintext gRPC:
deploy the brokers on a network clients cannot sniff, or terminate TLS in front of them.

The secret file (`--cluster-secret-file`): its bytes with surrounding ASCII whitespace stripped
(so `echo`/`kubectl create secret --from-literal` newlines do not matter), between
`SECRET_BYTES_MIN` and `SECRET_BYTES_MAX` bytes. Make one with
`head -c 32 /dev/urandom | base64 > cluster-secret`.

A standalone broker has no peers: it refuses every inter-broker call whatever the caller sends.
A cluster broker without a secret does not start (config.broker_config_from_settings).

Pure, except `load_cluster_secret` (reads one file).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLUSTER_SECRET_HEADER = "x-logbroker-cluster-secret-bin"  # "-bin": gRPC carries the value as raw bytes
SECRET_BYTES_MIN = 16
SECRET_BYTES_MAX = 4096
MAKE_ONE_HINT = "make one with: head -c 32 /dev/urandom | base64 > FILE"

CallMetadata = tuple[tuple[str, bytes], ...]


class ClusterSecretError(ValueError):
    """The secret file cannot be used (missing, unreadable, empty, too short or too long)."""


def parse_cluster_secret(data: bytes, source: str) -> bytes:
    """The secret in a file's bytes; raises ClusterSecretError naming `source`."""
    secret = data.strip()
    if not secret:
        raise ClusterSecretError(f"cluster secret file {source} is empty; {MAKE_ONE_HINT}")
    if len(secret) < SECRET_BYTES_MIN:
        raise ClusterSecretError(
            f"cluster secret in {source} is {len(secret)} bytes; at least {SECRET_BYTES_MIN} are needed; {MAKE_ONE_HINT}"
        )
    if len(secret) > SECRET_BYTES_MAX:
        raise ClusterSecretError(f"cluster secret in {source} is {len(secret)} bytes; at most {SECRET_BYTES_MAX}")
    return secret


def load_cluster_secret(path: Path | str) -> bytes:
    """Read and check the secret file; raises ClusterSecretError with a one-line reason."""
    try:
        with open(path, "rb") as f:
            data = f.read(SECRET_BYTES_MAX + 1024)  # bounded: a secret is small, trailing whitespace allowed
    except OSError as exc:
        raise ClusterSecretError(f"cannot read cluster secret file {path}: {exc.strerror or exc}") from None
    return parse_cluster_secret(data, str(path))


def call_metadata(secret: bytes) -> CallMetadata:
    """The metadata a broker sends on its inter-broker calls (none without a secret)."""
    return ((CLUSTER_SECRET_HEADER, secret),) if secret else ()


@dataclass(frozen=True)
class Refusal:
    """Why an inter-broker call is refused. `unauthenticated`: it carried no secret at all (gRPC
    UNAUTHENTICATED); otherwise it is not allowed (PERMISSION_DENIED)."""

    message: str
    unauthenticated: bool


def presented_secret(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    """The secret a call carries in its metadata (None: none). Several values: the first."""
    for key, value in metadata or ():
        if key == CLUSTER_SECRET_HEADER:
            return value if isinstance(value, bytes) else value.encode()
    return None


def check_peer(secret: bytes, cluster_mode: bool, presented: bytes | None, what: str) -> Refusal | None:
    """None if a call to `what` may proceed: a cluster broker with a secret, and the same secret
    presented (compared in constant time). Everything else is a refusal."""
    if not cluster_mode:
        return Refusal(f"{what} refused: this broker runs standalone and takes no inter-broker calls", False)
    if not secret:
        return Refusal(f"{what} refused: this broker has no cluster secret (--cluster-secret-file)", False)
    if presented is None:
        return Refusal(f"{what} is an inter-broker call: it needs the cluster secret (header "
                       f"{CLUSTER_SECRET_HEADER}); clients cannot make it", True)
    if not hmac.compare_digest(presented, secret):
        return Refusal(f"{what} refused: wrong cluster secret", False)
    return None

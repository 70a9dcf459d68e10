"""Who may make broker-only calls on a TLS broker (issue 18 item 4).

Broker-only calls are the Replica service (LeaderAndIsr, UpdateMetadata, StopReplica,
OffsetForLeaderEpoch, ControlledShutdown, ReportOfflineReplicas, ForwardReply) and a Fetch naming a
replica id. On every broker they first need the cluster secret (request_checks.require_cluster_peer);
on a broker with TLS the caller must in addition be a broker by its connection's principal
(User:<CN> of its verified client certificate, never a request field):

- its principal is one of the broker principals: `--broker-principals User:a,User:b`, by default
  User:<CN> of the broker's own `--tls-cert` (every broker of a cluster presents its own
  certificate on its calls to the others, so brokers sharing a CN, or a list naming each broker's,
  pass with no ACL at all); or
- with `--authorizer acl`: the ACLs grant it ClusterAction on the Cluster (super users pass), as
  Kafka's inter-broker principal needs.

Anything else is refused before the request is parsed: UNAUTHENTICATED without a certificate
(ANONYMOUS), PERMISSION_DENIED with one that is not a broker's; counted and logged as the secret's
refusals (request_checks.INTERBROKER_REFUSALS). A plaintext broker has no principals to check:
there the cluster secret alone decides (`BrokerPrincipals` is None). So it does on a TLS broker that
does not require client certificates (`--tls-client-auth none|requested`, as a cluster whose clients
log in with SCRAM runs: `requested` asks for no certificate on gRPC, where the controller's calls
arrive, so no broker principal can be seen there): the secret then travels encrypted, and
`--broker-principals` is refused with those settings (config.py). Kafka's answer, a separate
inter-broker listener with its own client-auth, is not built yet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from logbroker.log_throttle import LogThrottle
from logbroker.server.request_checks import INTERBROKER_REFUSALS, peer_host
from logbroker.server.request_context import ANONYMOUS, RequestContext, RequestRejected, RequestStatus
from logbroker.tls import ServerTls, certificate_common_name, principal_from_common_name

log = logging.getLogger(__name__)

ClusterActionCheck = Callable[[RequestContext], bool]  # does the authorizer grant ClusterAction on Cluster?


class BrokerPrincipals:
    """The check of a TLS broker's broker-only calls (see the module doc)."""

    def __init__(self, principals: frozenset[str], cluster_action: ClusterActionCheck | None = None,
                 refusals: LogThrottle = INTERBROKER_REFUSALS) -> None:
        self.principals = principals
        self._cluster_action = cluster_action
        self._refusals = refusals

    def is_broker(self, context: RequestContext) -> bool:
        if context.principal in self.principals:
            return True
        return self._cluster_action is not None and context.principal != ANONYMOUS and self._cluster_action(context)

    def require(self, context: RequestContext, what: str) -> None:
        """Refuse the call (UNAUTHENTICATED / PERMISSION_DENIED) unless its principal is a broker's."""
        if self.is_broker(context):
            return
        anonymous = context.principal == ANONYMOUS
        reason = "no client certificate" if anonymous else "not a broker principal"
        count = self._refusals.event((peer_host(context.peer), reason))
        if count:
            log.warning("refused %s from %s (%s): %s (refusals of this kind from this host since the last such "
                        "warning: %d; at most one warning per %.0f s)", what, context.peer or "an unknown peer",
                        context.principal, reason, count, self._refusals.interval_s)
        if anonymous:
            raise RequestRejected(RequestStatus.UNAUTHENTICATED,
                                  f"{what} is a broker-only call: it needs a broker's client certificate")
        raise RequestRejected(RequestStatus.PERMISSION_DENIED,
                              f"{what} is a broker-only call and {context.principal} is not a broker principal")


def broker_principals(tls: ServerTls | None, configured: tuple[str, ...],
                      cluster_action: ClusterActionCheck | None) -> BrokerPrincipals | None:
    """The check for a broker's settings; None on a plaintext broker, or one that does not require client
    certificates (the cluster secret alone, over TLS there)."""
    if tls is None or tls.client_auth != "required":
        return None
    names = frozenset(configured)
    if not names:
        own = principal_from_common_name(certificate_common_name(tls.cert_file))
        if own is None:
            log.warning("the broker's certificate %s has no usable common name: only principals granted "
                        "ClusterAction (--authorizer acl) may make broker-only calls; set --broker-principals",
                        tls.cert_file)
        names = frozenset({own} if own else ())
    log.info("broker-only calls need the cluster secret and one of the principals %s%s", sorted(names),
             " or ClusterAction on the Cluster" if cluster_action is not None else "")
    return BrokerPrincipals(names, cluster_action)

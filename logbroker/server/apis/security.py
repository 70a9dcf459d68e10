"""ACLs, SCRAM users and client quotas over the Admin API: CreateAcls, DeleteAcls, DescribeAcls,
AlterUserScramCredentials, DescribeUserScramCredentials, AlterClientQuotas, DescribeClientQuotas. The store calls block (ZooKeeper or LMDB),
so they run in a thread; after a change this broker reloads its authorizer (quotas) at once
(`on_change`, `on_quota_change`), the others through the store's change counters
(server/acl_cache.py, server/quota_cache.py). Each change is in the audit
log (server/audit.py, from the request layer).

Bad input (an unknown operation, a principal not written User:NAME, a host that is not an IP, a
credential with too few iterations) is answered with SECURITY_CONFIG_INVALID and the field's
problem, and nothing is stored: every entry of a request is checked before any is written.
Credentials arrive already salted and hashed (the client computes them from the password); nothing
here ever sees a password, and the answers carry no secret (DescribeUserScramCredentials lists
mechanisms only).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from logbroker.cluster.security_store import SecurityStore, check_user
from logbroker.security.acl import (
    AclBinding,
    AclError,
    parse_operation,
    parse_pattern_type,
    parse_permission,
    parse_resource_type,
)
from logbroker.security.quotas import Quota, QuotaEntity, QuotaError, QuotaKind, check_rate
from logbroker.security.scram import Mechanism, ScramCredential, ScramError
from logbroker.server.request_checks import check_count
from logbroker.server.request_context import RequestContext
from logbroker.v1 import logbroker_pb2 as pb


def binding_from_entry(e: pb.AclEntry) -> AclBinding:
    return AclBinding(e.principal, e.host or "*", parse_operation(e.operation), parse_permission(e.permission),
                      parse_resource_type(e.resource_type), e.name, parse_pattern_type(e.pattern_type or "literal"))


def entry_from_binding(b: AclBinding) -> pb.AclEntry:
    return pb.AclEntry(**b.to_json())


def filter_matches(f: pb.AclEntry, b: AclBinding) -> bool:
    """Every non-empty field of the filter equals the binding's (enum names case-insensitively)."""
    fields = b.to_json()
    return all(not want or fields[name].lower() == want.lower() if name not in ("principal", "name", "host")
               else not want or fields[name] == want
               for name, want in ((n, getattr(f, n)) for n in fields))


def credential_from_entry(e: pb.ScramCredentialEntry) -> tuple[str, ScramCredential]:
    cred = ScramCredential(Mechanism.parse(e.mechanism), e.salt, e.iterations, e.stored_key, e.server_key)
    return check_user(e.user), cred.validated()


def quota_from_entry(e: pb.QuotaEntry, rates_required: bool) -> Quota:
    entity = QuotaEntity(e.user if e.HasField("user") else None,
                         e.client_id if e.HasField("client_id") else None).validated()
    rates = {k: check_rate(k, getattr(e, k.value)) for k in QuotaKind if e.HasField(k.value)}
    if rates_required and not rates:
        raise QuotaError(f"a quota for {entity.describe()} sets no rate")
    return Quota(entity, rates)


def entry_from_quota(q: Quota) -> pb.QuotaEntry:
    return pb.QuotaEntry(**q.to_json())


class SecurityApis:
    def __init__(self, store: Callable[[], SecurityStore], on_change: Callable[[], Awaitable[None]],
                 on_quota_change: Callable[[], Awaitable[None]] | None = None) -> None:
        """`on_change` / `on_quota_change`: reload the broker's copy; awaited before the answer, so
        the caller's next request already sees its change (store_poller.py)."""
        self._store = store
        self._on_change = on_change
        self._on_quota_change = on_quota_change

    async def create_acls(self, context: RequestContext, req: pb.CreateAclsRequest) -> pb.CreateAclsResponse:
        check_count(len(req.acls), "acls")
        try:
            bindings = [binding_from_entry(e) for e in req.acls]
            created = await asyncio.to_thread(self._store().add_acls, bindings)
        except AclError as e:
            return pb.CreateAclsResponse(error_code=pb.SECURITY_CONFIG_INVALID, error_message=str(e))
        await self._on_change()
        return pb.CreateAclsResponse(created=created)

    async def delete_acls(self, context: RequestContext, req: pb.DeleteAclsRequest) -> pb.DeleteAclsResponse:
        try:
            removed = await asyncio.to_thread(self._store().remove_acls, lambda b: filter_matches(req.filter, b))
        except AclError as e:
            return pb.DeleteAclsResponse(error_code=pb.SECURITY_CONFIG_INVALID, error_message=str(e))
        await self._on_change()
        return pb.DeleteAclsResponse(deleted=[entry_from_binding(b) for b in removed])

    async def describe_acls(self, context: RequestContext, req: pb.DescribeAclsRequest) -> pb.DescribeAclsResponse:
        acls = await asyncio.to_thread(self._store().list_acls)
        return pb.DescribeAclsResponse(acls=[entry_from_binding(b) for b in acls if filter_matches(req.filter, b)])

    async def alter_user_scram_credentials(self, context: RequestContext,
                                           req: pb.AlterUserScramCredentialsRequest
                                           ) -> pb.AlterUserScramCredentialsResponse:
        check_count(len(req.upserts) + len(req.deletions), "users")
        try:
            upserts = [credential_from_entry(e) for e in req.upserts]
            deletions = [check_user(u) for u in req.deletions]
        except (AclError, ScramError) as e:
            return pb.AlterUserScramCredentialsResponse(error_code=pb.SECURITY_CONFIG_INVALID, error_message=str(e))
        deleted = await asyncio.to_thread(self._alter_users, upserts, deletions)
        return pb.AlterUserScramCredentialsResponse(deleted=deleted)

    def _alter_users(self, upserts: list[tuple[str, ScramCredential]], deletions: list[str]) -> int:
        store = self._store()
        for user, cred in upserts:
            store.set_credential(user, cred)
        return sum(store.delete_user(u) for u in deletions)

    async def describe_user_scram_credentials(self, context: RequestContext,
                                              req: pb.DescribeUserScramCredentialsRequest
                                              ) -> pb.DescribeUserScramCredentialsResponse:
        users = await asyncio.to_thread(self._store().list_users)
        return pb.DescribeUserScramCredentialsResponse(users=[
            pb.UserMechanisms(user=u, mechanisms=[m.value for m in mechs]) for u, mechs in sorted(users.items())])


    async def alter_client_quotas(self, context: RequestContext, req: pb.AlterClientQuotasRequest
                                  ) -> pb.AlterClientQuotasResponse:
        check_count(len(req.set) + len(req.deletions), "quotas")
        try:
            sets = [quota_from_entry(e, rates_required=True) for e in req.set]
            deletions = [quota_from_entry(e, rates_required=False).entity for e in req.deletions]
            deleted = await asyncio.to_thread(self._store().alter_quotas, sets, deletions)
        except QuotaError as e:
            return pb.AlterClientQuotasResponse(error_code=pb.INVALID_CONFIG, error_message=str(e))
        if self._on_quota_change is not None:
            await self._on_quota_change()
        return pb.AlterClientQuotasResponse(deleted=deleted)

    async def describe_client_quotas(self, context: RequestContext, req: pb.DescribeClientQuotasRequest
                                     ) -> pb.DescribeClientQuotasResponse:
        quotas = await asyncio.to_thread(self._store().list_quotas)
        quotas.sort(key=lambda q: (q.entity.user or "", q.entity.client_id or ""))
        return pb.DescribeClientQuotasResponse(quotas=[entry_from_quota(q) for q in quotas])

"""Where users' SCRAM credentials and the ACLs live: the metadata store (ZooKeeper in a cluster, the
embedded LMDB of a standalone broker). Every method blocks; call them off the event loop.

ZooKeeper layout (under the chroot)::

    /security/users/<user, %-quoted>      JSON {"SCRAM-SHA-256": credential, "SCRAM-SHA-512": ...}
                                          (credential: security/scram.py ScramCredential.to_json)
    /security/acls/<binding id>           JSON AclBinding.to_json(); the id is the first 32 hex
                                          digits of the SHA-256 of the binding's canonical JSON,
                                          so adding a binding twice stores it once
    /security/acl_version                 empty; its znode version is bumped in the same multi-op as
                                          every ACL change: brokers watch it and reload the ACLs
    /security/quotas/<entity id>          JSON Quota.to_json() (security/quotas.py); the id is the first
                                          32 hex digits of the SHA-256 of the entity's canonical JSON
    /security/quota_version               as acl_version, for the quotas

LMDB layout (the standalone broker's `__cluster_metadata` environment): db "users" (user -> the same
JSON), db "acls" (binding id -> the same JSON) and db "quotas" (entity id -> the same JSON); a change there is the broker's own, so it reloads
directly.

Bounds: at most `acl.MAX_ACLS` bindings (an add over it is refused whole), user names as
`scram.MAX_USER_CHARS`, at most `MAX_ACLS_PER_CHANGE` bindings added or removed at once, at most
`quotas.MAX_QUOTAS` quota entities. Secrets: only salted, hashed credentials are stored; passwords never reach
this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import quote, unquote

import lmdb
from kazoo.exceptions import NodeExistsError, NoNodeError

from logbroker.security.acl import MAX_ACLS, AclBinding, AclError
from logbroker.security.quotas import MAX_QUOTAS, Quota, QuotaEntity, QuotaError
from logbroker.security.scram import MAX_USER_CHARS, Mechanism, ScramCredential

SECURITY_PATH = "/security"
USERS_PATH = "/security/users"
ACLS_PATH = "/security/acls"
ACL_VERSION_PATH = "/security/acl_version"
QUOTAS_PATH = "/security/quotas"
QUOTA_VERSION_PATH = "/security/quota_version"
MAX_ACLS_PER_CHANGE = 400  # one ZooKeeper multi-op (zk_store._TXN_OPS_MAX is 500)


class SecurityStore(Protocol):
    def get_credentials(self, user: str) -> dict[Mechanism, ScramCredential]: ...

    def set_credential(self, user: str, cred: ScramCredential) -> None: ...

    def delete_user(self, user: str) -> bool: ...

    def list_users(self) -> dict[str, list[Mechanism]]: ...

    def list_acls(self) -> list[AclBinding]: ...

    def acl_version(self) -> int: ...

    def add_acls(self, bindings: list[AclBinding]) -> int: ...

    def remove_acls(self, match: Callable[[AclBinding], bool]) -> list[AclBinding]: ...

    def list_quotas(self) -> list[Quota]: ...

    def quota_version(self) -> int: ...

    def alter_quotas(self, sets: list[Quota], deletions: list[QuotaEntity]) -> int: ...


class ZkSession(Protocol):
    """What this store needs of a ZooKeeper session: cluster/zk_store.py's ZkStore."""

    @property
    def kazoo(self) -> Any: ...

    def wait(self, async_result: Any) -> Any: ...

    def gather(self, results: list[Any]) -> list[Any]: ...

    def children(self, path: str, watch: Callable[[Any], None] | None = None) -> list[str]: ...

    def commit(self, ops: Callable[[Any], None]) -> list[Any]: ...


def binding_id(b: AclBinding) -> str:
    return hashlib.sha256(json.dumps(b.to_json(), sort_keys=True).encode()).hexdigest()[:32]


def entity_id(e: QuotaEntity) -> str:
    return hashlib.sha256(json.dumps([e.user, e.client_id]).encode()).hexdigest()[:32]


def merged_quotas(current: dict[str, Quota], sets: list[Quota], deletions: list[QuotaEntity]
                  ) -> tuple[dict[str, Quota | None], int]:
    """The writes (id -> new quota, or None: delete) that apply `sets` (rates merged into the
    entity's) and `deletions` to `current`, and how many deletions removed something."""
    writes: dict[str, Quota | None] = {}
    deleted = 0
    for e in deletions:
        key = entity_id(e)
        if key in current:
            writes[key], deleted = None, deleted + 1
    for q in sets:
        key = entity_id(q.entity)
        old = writes.get(key, current.get(key))
        writes[key] = Quota(q.entity, {**(old.rates if old is not None else {}), **q.rates}).validated()
    if len({*current, *writes}) - sum(1 for k, v in writes.items() if v is None) > MAX_QUOTAS:
        raise QuotaError(f"over the limit of {MAX_QUOTAS} quota entities")
    return writes, deleted


def check_user(user: str) -> str:
    if not user or len(user) > MAX_USER_CHARS or any(ord(c) < 0x20 for c in user):
        raise AclError(f"user name must be 1..{MAX_USER_CHARS} printable characters")
    return user


def _creds_to_json(creds: dict[Mechanism, ScramCredential]) -> bytes:
    return json.dumps({m.value: c.to_json() for m, c in sorted(creds.items(), key=lambda kv: kv[0].value)}).encode()


def _creds_from_json(raw: bytes) -> dict[Mechanism, ScramCredential]:
    out = {}
    for name, obj in json.loads(raw).items():
        cred = ScramCredential.from_json(obj)
        out[Mechanism.parse(name)] = cred
    return out


class LocalSecurityStore:
    """SecurityStore over the standalone broker's LMDB environment (two named dbs in it)."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._users = env.open_db(b"users")
        self._acls = env.open_db(b"acls")
        self._quotas = env.open_db(b"quotas")

    def get_credentials(self, user: str) -> dict[Mechanism, ScramCredential]:
        with self._env.begin(db=self._users) as txn:
            raw = txn.get(user.encode())
        return {} if raw is None else _creds_from_json(bytes(raw))

    def set_credential(self, user: str, cred: ScramCredential) -> None:
        check_user(user)
        with self._env.begin(write=True, db=self._users) as txn:
            raw = txn.get(user.encode())
            creds = {} if raw is None else _creds_from_json(bytes(raw))
            creds[cred.mechanism] = cred
            txn.put(user.encode(), _creds_to_json(creds))

    def delete_user(self, user: str) -> bool:
        with self._env.begin(write=True, db=self._users) as txn:
            return bool(txn.delete(user.encode()))

    def list_users(self) -> dict[str, list[Mechanism]]:
        with self._env.begin(db=self._users) as txn:
            return {bytes(k).decode(): sorted(_creds_from_json(bytes(v)), key=lambda m: m.value) for k, v in txn.cursor()}

    def acl_version(self) -> int:
        """Changes with every write to this environment (topics too: a reload too many is harmless)."""
        return int(self._env.info()["last_txnid"])

    def list_acls(self) -> list[AclBinding]:
        with self._env.begin(db=self._acls) as txn:
            return [AclBinding.from_json(json.loads(bytes(v))) for _, v in txn.cursor()]

    def add_acls(self, bindings: list[AclBinding]) -> int:
        """Store the bindings not stored yet; returns how many were new."""
        with self._env.begin(write=True, db=self._acls) as txn:
            new = {binding_id(b): b for b in bindings if txn.get(binding_id(b).encode()) is None}
            if txn.stat(self._acls)["entries"] + len(new) > MAX_ACLS:
                raise AclError(f"over the limit of {MAX_ACLS} ACLs")
            for key, b in new.items():
                txn.put(key.encode(), json.dumps(b.to_json()).encode())
        return len(new)

    def remove_acls(self, match: Callable[[AclBinding], bool]) -> list[AclBinding]:
        removed = []
        with self._env.begin(write=True, db=self._acls) as txn:
            for key, raw in list(txn.cursor()):
                b = AclBinding.from_json(json.loads(bytes(raw)))
                if match(b):
                    txn.delete(bytes(key))
                    removed.append(b)
        return removed

    def quota_version(self) -> int:
        return int(self._env.info()["last_txnid"])

    def list_quotas(self) -> list[Quota]:
        with self._env.begin(db=self._quotas) as txn:
            return [Quota.from_json(json.loads(bytes(v))) for _, v in txn.cursor()]

    def alter_quotas(self, sets: list[Quota], deletions: list[QuotaEntity]) -> int:
        with self._env.begin(write=True, db=self._quotas) as txn:
            current = {bytes(k).decode(): Quota.from_json(json.loads(bytes(v))) for k, v in txn.cursor()}
            writes, deleted = merged_quotas(current, sets, deletions)
            for key, q in writes.items():
                if q is None:
                    txn.delete(key.encode())
                else:
                    txn.put(key.encode(), json.dumps(q.to_json()).encode())
        return deleted


class ZkSecurityStore:
    """SecurityStore over ZooKeeper, through the broker's (or the CLI's) ZkStore session."""

    def __init__(self, zk: ZkSession) -> None:
        self._zk = zk
        for path in (USERS_PATH, ACLS_PATH, QUOTAS_PATH):
            zk.wait(zk.kazoo.ensure_path_async(path))
        for path in (ACL_VERSION_PATH, QUOTA_VERSION_PATH):
            try:
                zk.wait(zk.kazoo.create_async(path, b""))
            except NodeExistsError:
                pass

    def _user_path(self, user: str) -> str:
        return f"{USERS_PATH}/{quote(check_user(user), safe='')}"

    def get_credentials(self, user: str) -> dict[Mechanism, ScramCredential]:
        try:
            raw, _ = self._zk.wait(self._zk.kazoo.get_async(self._user_path(user)))
        except NoNodeError:
            return {}
        return _creds_from_json(raw)

    def set_credential(self, user: str, cred: ScramCredential) -> None:
        path = self._user_path(user)
        for _ in range(5):  # a conditional read-modify-write; retried on a concurrent change
            try:
                raw, stat = self._zk.wait(self._zk.kazoo.get_async(path))
            except NoNodeError:
                try:
                    self._zk.wait(self._zk.kazoo.create_async(path, _creds_to_json({cred.mechanism: cred})))
                    return
                except NodeExistsError:
                    continue
            creds = _creds_from_json(raw)
            creds[cred.mechanism] = cred
            data, version = _creds_to_json(creds), stat.version
            results = self._zk.commit(lambda txn: txn.set_data(path, data, version))  # noqa: B023
            if not any(isinstance(r, Exception) for r in results):
                return
        raise AclError(f"user {user!r} changed concurrently; retry")

    def delete_user(self, user: str) -> bool:
        try:
            self._zk.wait(self._zk.kazoo.delete_async(self._user_path(user)))
            return True
        except NoNodeError:
            return False

    def list_users(self) -> dict[str, list[Mechanism]]:
        names = self._zk.children(USERS_PATH)
        got = self._zk.gather([self._zk.kazoo.get_async(f"{USERS_PATH}/{n}") for n in names])
        return {unquote(n): sorted(_creds_from_json(r[0]), key=lambda m: m.value)
                for n, r in zip(names, got, strict=True) if not isinstance(r, Exception)}

    def acl_version(self, watch: Callable[[Any], None] | None = None) -> int:
        """The ACLs' change counter; `watch` (one-shot, on kazoo's thread) fires at the next change."""
        _, stat = self._zk.wait(self._zk.kazoo.get_async(ACL_VERSION_PATH, watch=watch))
        return int(stat.version)

    def list_acls(self) -> list[AclBinding]:
        ids = self._zk.children(ACLS_PATH)
        got = self._zk.gather([self._zk.kazoo.get_async(f"{ACLS_PATH}/{i}") for i in ids])
        return [AclBinding.from_json(json.loads(r[0])) for r in got if not isinstance(r, Exception)]

    def add_acls(self, bindings: list[AclBinding]) -> int:
        if len(bindings) > MAX_ACLS_PER_CHANGE:
            raise AclError(f"at most {MAX_ACLS_PER_CHANGE} ACLs per change")
        existing = set(self._zk.children(ACLS_PATH))
        new = {binding_id(b): b for b in bindings if binding_id(b) not in existing}
        if len(existing) + len(new) > MAX_ACLS:
            raise AclError(f"over the limit of {MAX_ACLS} ACLs")
        if new:
            self._write(lambda txn: [txn.create(f"{ACLS_PATH}/{k}", json.dumps(b.to_json()).encode())
                                     for k, b in new.items()])
        return len(new)

    def remove_acls(self, match: Callable[[AclBinding], bool]) -> list[AclBinding]:
        ids = self._zk.children(ACLS_PATH)
        got = self._zk.gather([self._zk.kazoo.get_async(f"{ACLS_PATH}/{i}") for i in ids])
        doomed = {i: AclBinding.from_json(json.loads(r[0])) for i, r in zip(ids, got, strict=True)
                  if not isinstance(r, Exception)}
        doomed = {i: b for i, b in doomed.items() if match(b)}
        if len(doomed) > MAX_ACLS_PER_CHANGE:
            raise AclError(f"{len(doomed)} ACLs match: at most {MAX_ACLS_PER_CHANGE} are removed per change")
        if doomed:
            self._write(lambda txn: [txn.delete(f"{ACLS_PATH}/{i}") for i in doomed])
        return list(doomed.values())

    def quota_version(self, watch: Callable[[Any], None] | None = None) -> int:
        _, stat = self._zk.wait(self._zk.kazoo.get_async(QUOTA_VERSION_PATH, watch=watch))
        return int(stat.version)

    def _read_quotas(self) -> dict[str, tuple[Quota, int]]:
        ids = self._zk.children(QUOTAS_PATH)
        got = self._zk.gather([self._zk.kazoo.get_async(f"{QUOTAS_PATH}/{i}") for i in ids])
        return {i: (Quota.from_json(json.loads(r[0])), r[1].version)
                for i, r in zip(ids, got, strict=True) if not isinstance(r, Exception)}

    def list_quotas(self) -> list[Quota]:
        return [q for q, _ in self._read_quotas().values()]

    def alter_quotas(self, sets: list[Quota], deletions: list[QuotaEntity]) -> int:
        """One conditional multi-op (each znode at the version read, and the version bump): all or nothing."""
        if len(sets) + len(deletions) > MAX_ACLS_PER_CHANGE:
            raise QuotaError(f"at most {MAX_ACLS_PER_CHANGE} quota entities per change")
        read = self._read_quotas()
        writes, deleted = merged_quotas({k: q for k, (q, _) in read.items()}, sets, deletions)

        def run(txn: Any) -> None:
            for key, q in writes.items():
                path = f"{QUOTAS_PATH}/{key}"
                if q is None:
                    txn.delete(path, read[key][1])
                elif key in read:
                    txn.set_data(path, json.dumps(q.to_json()).encode(), read[key][1])
                else:
                    txn.create(path, json.dumps(q.to_json()).encode())
            txn.set_data(QUOTA_VERSION_PATH, b"")
        if writes and any(isinstance(r, Exception) for r in self._zk.commit(run)):
            raise QuotaError("the quotas changed concurrently; nothing was applied, retry")
        return deleted

    def _write(self, ops: Callable[[Any], Iterable[Any]]) -> None:
        """The ACL changes and the version bump in one multi-op: all or nothing."""
        def run(txn: Any) -> None:
            list(ops(txn))
            txn.set_data(ACL_VERSION_PATH, b"")
        results = self._zk.commit(run)
        if any(isinstance(r, Exception) for r in results):
            raise AclError("the ACLs changed concurrently; nothing was applied, retry")

"""Users and ACLs in the metadata store (cluster/security_store.py): the same contract over the
standalone broker's LMDB and over a real ZooKeeper (one per session, a chroot per test), and a
second session seeing an ACL change through its watch."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from logbroker.cluster.local_store import LocalMetadataStore
from logbroker.cluster.security_store import MAX_ACLS_PER_CHANGE, SecurityStore, ZkSecurityStore
from logbroker.cluster.zk_store import ZkStore
from logbroker.security.acl import AclBinding, AclError, Operation, PatternType, Permission, ResourceType
from logbroker.security.quotas import DEFAULT, Quota, QuotaEntity, QuotaError, QuotaKind
from logbroker.security.scram import Mechanism, make_credential

pytestmark = pytest.mark.timeout(60)


def _acl(principal: str, name: str, op: Operation = Operation.READ) -> AclBinding:
    return AclBinding(principal, "*", op, Permission.ALLOW, ResourceType.TOPIC, name, PatternType.LITERAL)


@pytest.fixture(params=["local", "zookeeper"])
def store(request, tmp_path) -> Iterator[SecurityStore]:
    if request.param == "local":
        meta = LocalMetadataStore(tmp_path)
        yield meta.security()
        meta.close()
        return
    zk = ZkStore(request.getfixturevalue("zookeeper").address, chroot=request.getfixturevalue("zk_chroot"),
                 session_timeout_ms=4000)
    zk.start()
    try:
        yield ZkSecurityStore(zk)
    finally:
        zk.close()


def test_users_keep_one_credential_per_mechanism(store):
    a256 = make_credential(Mechanism.SCRAM_SHA_256, "pw")
    store.set_credential("alice", a256)
    store.set_credential("alice", make_credential(Mechanism.SCRAM_SHA_512, "pw"))
    store.set_credential("bob/../x", make_credential(Mechanism.SCRAM_SHA_256, "pw2"))  # a path-like name
    assert store.get_credentials("alice")[Mechanism.SCRAM_SHA_256] == a256
    assert store.list_users() == {"alice": [Mechanism.SCRAM_SHA_256, Mechanism.SCRAM_SHA_512],
                                  "bob/../x": [Mechanism.SCRAM_SHA_256]}
    assert store.delete_user("alice") and not store.delete_user("alice")
    assert store.get_credentials("alice") == {}


def test_acls_add_once_and_remove_by_match(store):
    a, b = _acl("User:a", "orders"), _acl("User:b", "orders", Operation.WRITE)
    assert store.add_acls([a, b, a]) == 2
    assert store.add_acls([a]) == 0
    assert sorted(x.principal for x in store.list_acls()) == ["User:a", "User:b"]
    assert store.remove_acls(lambda x: x.principal == "User:a") == [a]
    assert store.list_acls() == [b]


def test_quotas_merge_rates_delete_and_move_the_version(store):
    alice, default = QuotaEntity("alice", None), QuotaEntity(DEFAULT, "app")
    v0 = store.quota_version()
    assert store.alter_quotas([Quota(alice, {QuotaKind.PRODUCE: 100.0}),
                               Quota(default, {QuotaKind.REQUEST: 5.0})], []) == 0
    v1 = store.quota_version()
    assert v1 != v0
    store.alter_quotas([Quota(alice, {QuotaKind.FETCH: 7.0})], [])  # merged into alice's
    got = {q.entity: q.rates for q in store.list_quotas()}
    assert got == {alice: {QuotaKind.PRODUCE: 100.0, QuotaKind.FETCH: 7.0}, default: {QuotaKind.REQUEST: 5.0}}
    assert store.alter_quotas([], [alice, QuotaEntity("nobody", None)]) == 1
    assert [q.entity for q in store.list_quotas()] == [default]
    assert store.quota_version() != v1
    with pytest.raises(QuotaError, match="producer_byte_rate must be"):
        store.alter_quotas([Quota(alice, {QuotaKind.PRODUCE: -1.0})], [])
    assert [q.entity for q in store.list_quotas()] == [default]


def test_too_many_acls_in_one_zookeeper_change_are_refused_whole(store):
    """One ZooKeeper multi-op holds every change (all or nothing), so a change has a size limit."""
    many = [_acl("User:a", f"t{i}") for i in range(MAX_ACLS_PER_CHANGE + 1)]
    if not isinstance(store, ZkSecurityStore):
        assert store.add_acls(many) == len(many)  # one LMDB transaction: no such limit
        return
    with pytest.raises(AclError, match="per change"):
        store.add_acls(many)
    assert store.list_acls() == []


def test_a_second_zookeeper_session_is_told_of_an_acl_change(zookeeper, zk_chroot):
    stores = [ZkStore(zookeeper.address, chroot=zk_chroot, session_timeout_ms=4000) for _ in range(2)]
    try:
        for s in stores:
            s.start()
        writer, reader = ZkSecurityStore(stores[0]), ZkSecurityStore(stores[1])
        fired = threading.Event()
        before = reader.acl_version(watch=lambda _event: fired.set())
        writer.add_acls([_acl("User:a", "orders")])
        assert fired.wait(10)
        assert reader.acl_version() > before
        assert [x.name for x in reader.list_acls()] == ["orders"]
    finally:
        for s in stores:
            s.close()

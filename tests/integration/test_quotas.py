"""Client quotas (security/quotas.py, server/apis/throttling.py) on a real broker: a quota set with
`logbroker quotas set` is applied at once, a producer (consumer) over it is told `throttle_time_ms`
and held near its rate, a client without a quota is not throttled; list and delete work; bad input
is refused with a clear message and stores nothing.

The broker runs with short quota windows (3 x 500 ms), so the burst a rate allows at first (the
measurement spans at least two windows) is small next to the few seconds measured. Rates are
asserted loosely (under 2x the quota): the point is throttling, not a benchmark."""

from __future__ import annotations

import json
import time

import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.errors import InvalidConfigError
from tests.conftest import wait_for
from tests.integration.test_cli import assert_one_line_error, cli

pytestmark = pytest.mark.timeout(120)

QUOTA_FLAGS = ["--quota-window-num", "3", "--quota-window-size-ms", "500"]
RATE = 400_000  # bytes/s
VALUE = b"x" * 10_000


def _produce(b, client_id: str, total: int) -> tuple[float, Producer]:
    p = Producer(b.bootstrap, client_id=client_id, linger_ms=5)
    try:
        start = time.monotonic()
        futures = [p.send("q", VALUE) for _ in range(total // len(VALUE))]
        for f in futures:
            f.get(timeout=60)
        return time.monotonic() - start, p
    finally:
        p.close()


def test_a_producer_over_its_quota_is_throttled_and_another_is_not(broker_factory):
    b = broker_factory(extra_args=QUOTA_FLAGS)
    cli(b, "topics", "create", "q", "--partitions", "1")
    out = cli(b, "quotas", "set", "--client-id", "slow", "--producer-byte-rate", str(RATE))
    assert b"producer_byte_rate=400000" in out.stdout
    listed = json.loads(cli(b, "quotas", "list", "--format", "json").stdout)
    assert listed == [{"client_id": "slow", "producer_byte_rate": RATE}]

    total = 5 * RATE  # ~4-5 s at the quota
    elapsed, slow = _produce(b, "slow", total)
    assert slow.throttle.throttled_responses > 0 and slow.throttle.last_throttle_time_ms > 0
    assert total / elapsed < 2 * RATE, f"{total / elapsed:.0f} B/s against a quota of {RATE}"
    assert elapsed < 20

    elapsed_fast, fast = _produce(b, "fast", total)
    assert fast.throttle.throttled_responses == 0
    assert elapsed_fast < elapsed

    assert b"deleted" in cli(b, "quotas", "delete", "--client-id", "slow").stdout
    assert json.loads(cli(b, "quotas", "list", "--format", "json").stdout) == []
    gone = cli(b, "quotas", "delete", "--client-id", "slow", check=False)
    assert gone.returncode == 1 and b"did not exist" in gone.stdout
    _, again = _produce(b, "slow", 4 * len(VALUE))
    assert again.throttle.throttled_responses == 0
    audit = [line for line in b.log_path.read_text().splitlines()
             if '"api":"AlterClientQuotas"' in line]
    assert len(audit) >= 3 and "Quota:client_id=slow producer_byte_rate=400000" in audit[0]


def test_a_consumer_over_its_fetch_quota_is_throttled(broker_factory):
    b = broker_factory(extra_args=QUOTA_FLAGS)
    cli(b, "topics", "create", "q", "--partitions", "1")
    total = 4 * RATE
    _produce(b, "loader", total)
    cli(b, "quotas", "set", "--default-user", "--client-id", "reader", "--consumer-byte-rate", str(RATE))
    # small fetches, so the rate is measured over many (one fetch of it all would be throttled only after)
    with Consumer(b.bootstrap, client_id="reader", auto_offset_reset="earliest", fetch_max_bytes=100_000,
                  max_partition_fetch_bytes=100_000) as c:
        c.assign([("q", 0)])
        got, start = 0, time.monotonic()
        while got < total // len(VALUE) and time.monotonic() - start < 30:
            got += len(c.poll(timeout_ms=500))
        elapsed = time.monotonic() - start
        assert got == total // len(VALUE)
        assert c.throttle.throttled_responses > 0
        assert total / elapsed < 2 * RATE, f"{total / elapsed:.0f} B/s against a quota of {RATE}"


def test_bad_quotas_are_refused_and_nothing_is_stored(broker):
    for args, needle in [
        (["--client-id", "x", "--producer-byte-rate", "-5"], "producer_byte_rate must be a number > 0"),
        (["--user", "a", "--request-percentage", "0"], "request_percentage must be a number > 0"),
        (["--producer-byte-rate", "5"], "a quota names a user, a client id, or both"),
        (["--user", "a"], "name at least one rate"),
        (["--user", "a", "--default-user", "--producer-byte-rate", "5"], "not both"),
    ]:
        assert_one_line_error(cli(broker, "quotas", "set", *args, check=False), needle)
    proc = cli(broker, "quotas", "set", "--user", "a", "--bogus", "1", check=False)
    assert proc.returncode == 2 and b"unrecognized arguments: --bogus" in proc.stderr
    proc = cli(broker, "quotas", "set", "--user", "a", "--producer-byte-rate", "lots", check=False)
    assert proc.returncode == 2 and b"not a number: 'lots'" in proc.stderr
    with Admin(broker.bootstrap) as admin:  # the broker checks too (a client that skips the CLI)
        with pytest.raises(InvalidConfigError, match="consumer_byte_rate must be"):
            admin.set_quota(user="a", consumer_byte_rate=-1.0)
        with pytest.raises(InvalidConfigError, match="sets no rate"):
            admin.set_quota(user="a")
        with pytest.raises(InvalidConfigError, match="user must be"):
            admin.set_quota(user="", producer_byte_rate=1.0)
        assert admin.describe_quotas() == []
        admin.set_quota(user="a", producer_byte_rate=1.0)
        admin.set_quota(user="a", request_percentage=50.0)  # merged: the byte rate stays
        assert admin.describe_quotas() == [{"user": "a", "producer_byte_rate": 1.0, "request_percentage": 50.0}]
    assert b"user=a\tproducer_byte_rate=1 request_percentage=50" in cli(broker, "quotas", "list").stdout


def test_with_acls_quotas_need_alter_cluster_and_a_user_quota_applies_to_the_principal(broker_factory):
    from logbroker.cluster.local_store import LocalMetadataStore
    from logbroker.errors import PermissionDeniedError
    from logbroker.security.acl import CLUSTER_NAME, AclBinding, Operation, Permission, ResourceType

    def grant(op: Operation, rtype: ResourceType, name: str) -> AclBinding:
        return AclBinding("User:ANONYMOUS", "*", op, Permission.ALLOW, rtype, name)

    b = broker_factory(extra_args=["--authorizer", "acl", *QUOTA_FLAGS])
    meta = LocalMetadataStore(b.data_dir)
    meta.security().add_acls([grant(Operation.CREATE, ResourceType.CLUSTER, CLUSTER_NAME),
                              grant(Operation.DESCRIBE, ResourceType.CLUSTER, CLUSTER_NAME),
                              grant(Operation.WRITE, ResourceType.TOPIC, "q")])
    with Admin(b.bootstrap, request_timeout_ms=5000) as admin:
        def described() -> bool:
            try:
                return admin.describe_quotas() == []
            except PermissionDeniedError:
                return False

        wait_for(described, 15, "the broker to apply the bootstrap ACLs")
        with pytest.raises(PermissionDeniedError):
            admin.set_quota(user="ANONYMOUS", producer_byte_rate=RATE)
        meta.security().add_acls([grant(Operation.ALTER, ResourceType.CLUSTER, CLUSTER_NAME)])
        meta.close()
        assert admin.describe_quotas() == []  # the refused change stored nothing

        def altered() -> bool:
            try:
                admin.set_quota(user="ANONYMOUS", producer_byte_rate=RATE)
                return True
            except PermissionDeniedError:
                return False

        wait_for(altered, 15, "the broker to apply the Alter Cluster ACL")
        admin.create_topic("q", partitions=1)
    total = 4 * RATE
    elapsed, p = _produce(b, "any-client", total)  # keyed on the principal, whatever the client id
    assert p.throttle.throttled_responses > 0
    assert total / elapsed < 2 * RATE, f"{total / elapsed:.0f} B/s against a quota of {RATE}"


@pytest.mark.slow
def test_a_quota_set_through_one_broker_is_applied_by_the_other_and_followers_are_not_throttled(
        zookeeper, zk_chroot, tmp_path):
    """The quota goes to ZooKeeper through one broker; the leader of the partition, another broker,
    throttles the producer within seconds. A default user fetch quota far below the produced rate
    does not slow replication: follower fetches (cluster secret, replica id) are never throttled,
    so acks=all produces complete at the producer's own quota."""
    from tests.cluster import Cluster

    c = Cluster(zookeeper, zk_chroot, tmp_path, 2, extra_args=QUOTA_FLAGS).start()
    try:
        with Admin(c.bootstrap, request_timeout_ms=5000) as admin:
            admin.create_topic("q", partitions=1, replication_factor=2)
        leader = c.leader_of("q", 0)
        via = c.brokers[1 - leader]
        cli(via, "quotas", "set", "--client-id", "slow", "--producer-byte-rate", str(RATE))
        cli(via, "quotas", "set", "--default-user", "--consumer-byte-rate", str(RATE // 20))

        def throttled_on_the_leader() -> bool:
            with Producer(c.bootstrap, client_id="slow", acks="all", linger_ms=5) as p:
                for f in [p.send("q", VALUE, partition=0) for _ in range(2 * RATE // len(VALUE))]:
                    f.get(timeout=30)
                return p.throttle.throttled_responses > 0

        wait_for(throttled_on_the_leader, 30, "the leader to apply the quota set through the other broker")
        total = 4 * RATE
        p = Producer(c.bootstrap, client_id="slow", acks="all", linger_ms=5)
        try:
            start = time.monotonic()
            for f in [p.send("q", VALUE, partition=0) for _ in range(total // len(VALUE))]:
                f.get(timeout=60)
            elapsed = time.monotonic() - start
        finally:
            p.close()
        assert p.throttle.throttled_responses > 0
        assert RATE / 2 < total / elapsed < 2 * RATE, f"{total / elapsed:.0f} B/s against a quota of {RATE}"
    finally:
        c.stop()

from __future__ import annotations

from kazoo.client import KazooClient


def test_real_zookeeper_answers(zookeeper, zk_chroot):
    client = KazooClient(hosts=zookeeper.address + zk_chroot, timeout=10)
    client.start(timeout=15)
    try:
        client.ensure_path("/x")
        assert client.exists("/x") is not None
    finally:
        client.stop()
        client.close()

"""The tests' ZooKeeper: the same launcher `logbroker dev-cluster` uses."""

from logbroker.cluster.dev_cluster import ZooKeeperProcess, zookeeper_available

__all__ = ["ZooKeeperProcess", "zookeeper_available"]

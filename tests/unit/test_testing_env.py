"""logbroker.testing's child environment: a developer's LOGBROKER_* settings never reach a test broker,
and the broker runs the logbroker the tests import."""

from pathlib import Path

import logbroker
from logbroker.testing import broker_env


def test_logbroker_settings_are_dropped_and_zookeeper_jars_kept():
    env = broker_env({"LOGBROKER_ZOOKEEPER": "zk:2181", "LOGBROKER_LISTEN": "0.0.0.0:9092",
                      "LOGBROKER_ZOOKEEPER_JARS": "/opt/zk.jar", "HOME": "/home/me"})
    assert "LOGBROKER_ZOOKEEPER" not in env and "LOGBROKER_LISTEN" not in env
    assert env["LOGBROKER_ZOOKEEPER_JARS"] == "/opt/zk.jar" and env["HOME"] == "/home/me"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_the_imported_package_goes_first_on_the_path():
    root = str(Path(logbroker.__file__).resolve().parent.parent)
    env = broker_env({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(":") == [root, "/elsewhere"]

from __future__ import annotations

import pytest

from logbroker.cluster.metadata import normalize_topic_config, validate_topic_name
from logbroker.errors import InvalidConfigError, InvalidTopicError


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\x00b", "x" * 250, "ü", "a b", "a\\b"])
def test_bad_topic_names(name):
    with pytest.raises(InvalidTopicError):
        validate_topic_name(name)


@pytest.mark.parametrize("name", ["a", "orders.v1", "my_topic-2", "x" * 249, "...a"])
def test_good_topic_names(name):
    validate_topic_name(name)


def test_topic_config():
    cfg = normalize_topic_config({"retention.ms": "1000", "cleanup_policy": "compact"})
    assert cfg["retention_ms"] == "1000" and cfg["cleanup_policy"] == "compact"
    for bad in ({"nope": "1"}, {"retention_ms": "x"}, {"segment_bytes": "1"}, {"cleanup_policy": "zap"}):
        with pytest.raises(InvalidConfigError):
            normalize_topic_config(bad)


@pytest.mark.parametrize("group", ["", ".", "..", "a/b", "nul\x00", "g" * 250])
def test_bad_group_ids(group):
    from logbroker.cluster.metadata import validate_group_id
    from logbroker.errors import InvalidGroupIdError

    with pytest.raises(InvalidGroupIdError):
        validate_group_id(group)

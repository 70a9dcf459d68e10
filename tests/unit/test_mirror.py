"""The mirror's pure parts: topic selection and naming, the progress header, the offset map."""

from __future__ import annotations

import re

import pytest

from logbroker.mirror import naming, progress
from logbroker.mirror.offset_map import OffsetMap, Run, copied_runs


def test_topics_match_the_whole_name_and_never_internal_ones():
    topics = ["orders", "orders-eu", "payments", "__consumer_offsets", "__orders"]
    assert naming.mirrored_topics(topics, re.compile("orders.*"), None, None) == ["orders", "orders-eu"]
    assert naming.mirrored_topics(topics, re.compile(".*"), None, None) == ["orders", "orders-eu", "payments"]


def test_prefix_names_the_target_topic():
    assert naming.target_topic("orders", "us-east") == "us-east.orders"
    assert naming.target_topic("orders", None) == "orders"


def test_active_active_never_mirrors_back():
    # on A: its own topic, and B's topic mirrored here by the B->A mirror (prefix "b")
    on_a = ["orders", "b.orders"]
    assert naming.mirrored_topics(on_a, re.compile(".*"), "a", "b") == ["orders"]
    # a topic carrying our own prefix would loop through a third cluster
    assert naming.mirrored_topics(["a.orders", "x"], re.compile(".*"), "a", None) == ["x"]


@pytest.mark.parametrize("alias", ["", "a.b", "a b", "x" * 65])
def test_bad_aliases_are_refused(alias):
    with pytest.raises(ValueError, match="--prefix"):
        naming.check_alias(alias, "--prefix")


def test_the_progress_header_round_trips_and_replaces_an_earlier_one():
    headers = progress.with_source([("k", b"v"), (progress.SRC_HEADER, b"9:9")], 3, 1042)
    assert headers == [("k", b"v"), (progress.SRC_HEADER, b"3:1042")]
    assert progress.source_position(headers, 3) == 1042
    assert progress.source_position(headers, 2) is None  # another partition's record
    assert progress.source_position([("k", b"v")], 3) is None
    for bad in (None, b"", b"3", b"3:", b"x:1", b"1:-2", b"1:" + b"9" * 80):
        assert progress.decode(bad) is None


def test_contiguous_copies_are_one_run():
    m = OffsetMap()
    tp = ("t", 0)
    for src in range(100, 200):
        m.record(tp, src, src - 100)
    assert m.runs(tp) == [Run(100, 0, 100)]
    assert m.mirrored_end(tp) == 200
    assert m.translate(tp, 150) == 50
    assert m.translate(tp, 200) == 100  # everything read: the target's end
    assert m.translate(tp, 250) == 100  # not copied yet: re-read on B, never skipped
    assert m.translate(tp, 99) is None  # before what this mirror saw
    assert m.translate(("t", 1), 0) is None


def test_a_gap_in_the_source_translates_to_the_next_copy():
    m = OffsetMap()
    tp = ("t", 0)
    for src, tgt in ((0, 0), (1, 1), (2, 2), (10, 3), (11, 4)):  # 3..9 compacted away on the source
        m.record(tp, src, tgt)
    assert m.runs(tp) == [Run(0, 0, 3), Run(10, 3, 2)]
    assert m.translate(tp, 2) == 2
    assert m.translate(tp, 3) == 3
    assert m.translate(tp, 9) == 3
    assert m.translate(tp, 11) == 4
    assert m.translate(tp, 12) == 5


def test_a_restart_below_what_was_known_starts_over_and_runs_are_bounded():
    m = OffsetMap(max_runs=2)
    tp = ("t", 0)
    m.record(tp, 0, 0)
    m.record(tp, 5, 1)
    m.record(tp, 9, 2)
    assert m.runs(tp) == [Run(5, 1, 1), Run(9, 2, 1)]  # the oldest dropped
    m.record(tp, 3, 7)  # re-seeded lower (a restart): the old runs are no longer the truth
    assert m.runs(tp) == [Run(3, 7, 1)]
    with pytest.raises(ValueError):
        OffsetMap(max_runs=0)


def _args(*argv: str):
    from logbroker.cli import build_parser

    return build_parser().parse_args(["mirror", "--source", "a:1", "--target", "b:2", *argv])


def test_the_command_line_checks_its_flags_before_connecting():
    from logbroker.mirror.command import MirrorCliError, _settings

    s = _settings(_args("--topics", "orders.*", "--prefix", "us-east", "--sync-group-offsets", "app"))
    assert (s.topics, s.prefix, s.sync_groups, s.group) == ("orders.*", "us-east", "app", "mirror-b-2")
    for argv, message in ((["--topics", "("], "--topics"), (["--topics", "x", "--prefix", "a.b"], "--prefix"),
                          (["--topics", "x", "--sync-group-offsets", "["], "--sync-group-offsets"),
                          (["--topics", "x", "--flush-interval-ms", "0"], "--flush-interval-ms"),
                          (["--topics", "x", "--status-port", "70000"], "--status-port")):
        with pytest.raises(MirrorCliError, match=message):
            _settings(_args(*argv))


def test_a_seed_from_the_target_translates_what_an_earlier_mirror_copied():
    m = OffsetMap()
    tp = ("t", 0)
    m.seed(tp, Run(100, 0, 50))  # the target held source 100..149 at 0..49 when this mirror started
    m.record(tp, 150, 50)
    assert m.runs(tp) == [Run(100, 0, 51)]
    assert m.translate(tp, 120) == 20
    with pytest.raises(ValueError):
        m.seed(tp, Run(0, 0, 0))


def test_the_progress_header_is_added_to_records_without_headers():
    assert progress.with_source((), 0, 7) == [(progress.SRC_HEADER, b"0:7")]
    assert progress.with_source((("a", None),), 1, 8) == [("a", None), (progress.SRC_HEADER, b"1:8")]


def test_runs_extend_by_whole_chunks_and_a_lower_restart_starts_over():
    m = OffsetMap()
    tp = ("t", 0)
    m.record_run(tp, 0, 10, 5)
    m.record_run(tp, 5, 15, 3)  # the next batch, both sides contiguous
    m.record_run(tp, 9, 18, 2)  # a source gap
    assert m.runs(tp) == [Run(0, 10, 8), Run(9, 18, 2)]
    m.record_run(tp, 4, 30, 1)
    assert m.runs(tp) == [Run(4, 30, 1)]
    with pytest.raises(ValueError):
        m.record_run(tp, 5, 31, 0)


def test_a_contiguous_chunk_maps_one_run_per_target_batch():
    # source 100..109 went to B in two batches: 50..55 and (another producer wrote in between) 60..63
    assert copied_runs(100, None, [(2, 50, 6), (2, 60, 4)]) == [Run(100, 50, 6), Run(106, 60, 4)]
    assert copied_runs(100, None, []) == []


def test_a_chunk_of_a_compacted_source_maps_each_stretch():
    # source offsets 3, 4, 7, 8, 9 (5 and 6 compacted away) to target 20..24 in one batch
    assert copied_runs(3, [3, 4, 7, 8, 9], [(0, 20, 5)]) == [Run(3, 20, 2), Run(7, 22, 3)]
    # split over two target batches at 20..21 and 30..32
    assert copied_runs(3, [3, 4, 7, 8, 9], [(0, 20, 2), (0, 30, 3)]) == [Run(3, 20, 2), Run(7, 30, 3)]

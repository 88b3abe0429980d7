"""The dispatcher's pure decisions on plain values: lanes, commits, crash retries."""

from __future__ import annotations

from collections import Counter

import pytest

from mayfly.eventlog import Position
from mayfly.events import Priority
from mayfly.runtime.policy import (
    DEFAULT_WEIGHTS,
    CrashDecision,
    after_crash,
    commit_progress,
    pick_lane,
    position_of,
)

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW
ALL = [HIGH, NORMAL, LOW]


def _picks(
    count: int,
    candidates: list[Priority],
    credits: dict[Priority, int] | None = None,
    weights: dict[Priority, int] | None = None,
) -> list[Priority | None]:
    credits = {} if credits is None else credits
    if weights is None:
        return [pick_lane(candidates, credits) for _ in range(count)]
    return [pick_lane(candidates, credits, weights) for _ in range(count)]


# --- pick_lane ------------------------------------------------------------------------


def test_default_weights_are_8_3_1() -> None:
    assert dict(DEFAULT_WEIGHTS) == {HIGH: 8, NORMAL: 3, LOW: 1}


def test_twelve_picks_with_every_lane_busy_give_each_lane_its_share() -> None:
    picks = _picks(12, ALL)
    assert Counter(picks) == {HIGH: 8, NORMAL: 3, LOW: 1}


def test_picks_are_spread_out_high_first() -> None:
    # Smooth weighted round-robin with 8/3/1, worked out by hand:
    # each round every lane earns its weight, the richest pays the total (12).
    assert _picks(12, ALL) == [
        HIGH, NORMAL, HIGH, HIGH, LOW, HIGH, NORMAL, HIGH, HIGH, HIGH, NORMAL, HIGH,
    ]  # fmt: skip


def test_the_share_holds_over_every_full_cycle() -> None:
    credits: dict[Priority, int] = {}
    for _ in range(5):
        assert Counter(_picks(12, ALL, credits)) == {HIGH: 8, NORMAL: 3, LOW: 1}
        assert credits == {HIGH: 0, NORMAL: 0, LOW: 0}  # a full cycle leaves no debt


def test_low_is_never_starved_by_a_busy_high_lane() -> None:
    picks = _picks(9, [HIGH, LOW])
    assert Counter(picks) == {HIGH: 8, LOW: 1}


def test_ties_go_to_the_higher_priority_whatever_the_candidate_order() -> None:
    equal = {HIGH: 1, NORMAL: 1, LOW: 1}
    assert _picks(3, [LOW, NORMAL, HIGH], weights=equal) == [HIGH, NORMAL, LOW]
    assert _picks(2, [LOW, NORMAL], weights=equal) == [NORMAL, LOW]


def test_a_lane_without_work_is_never_picked() -> None:
    credits: dict[Priority, int] = {HIGH: 100}
    picks = _picks(8, [NORMAL, LOW], credits)
    assert HIGH not in picks
    assert Counter(picks) == {NORMAL: 6, LOW: 2}
    assert credits[HIGH] == 100  # an idle lane neither earns nor pays
    assert _picks(4, [LOW]) == [LOW] * 4


def test_credits_are_updated_in_place() -> None:
    credits: dict[Priority, int] = {}
    assert pick_lane(ALL, credits) is HIGH
    assert credits == {HIGH: 8 - 12, NORMAL: 3, LOW: 1}
    assert pick_lane(ALL, credits) is NORMAL
    assert credits == {HIGH: 4, NORMAL: 6 - 12, LOW: 2}


def test_credits_carry_over_between_calls() -> None:
    # NORMAL is owed from earlier rounds, so it goes before HIGH's bigger weight.
    credits = {HIGH: 0, NORMAL: 10, LOW: 0}
    assert pick_lane(ALL, credits) is NORMAL
    assert credits == {HIGH: 8, NORMAL: 13 - 12, LOW: 1}


def test_custom_weights() -> None:
    picks = _picks(8, ALL, weights={HIGH: 1, NORMAL: 1, LOW: 2})
    assert Counter(picks) == {HIGH: 2, NORMAL: 2, LOW: 4}


def test_no_candidates_picks_nothing_and_touches_no_credit() -> None:
    credits = {HIGH: 5, LOW: -3}
    assert pick_lane([], credits) is None
    assert credits == {HIGH: 5, LOW: -3}


# --- commit_progress --------------------------------------------------------------------


def test_commits_up_to_the_first_outstanding_offset() -> None:
    assert commit_progress({0: 10}, {0: {7, 4, 9}}, {0: 2}) == {0: 4}


def test_commits_up_to_the_next_offset_when_nothing_is_outstanding() -> None:
    assert commit_progress({0: 10}, {0: set()}, {0: 2}) == {0: 10}
    assert commit_progress({0: 10}, {}, {}) == {0: 10}


def test_never_commits_backwards_or_in_place() -> None:
    assert commit_progress({0: 10}, {0: {4}}, {0: 6}) == {}
    assert commit_progress({0: 10}, {0: {6}}, {0: 6}) == {}
    assert commit_progress({0: 10}, {}, {0: 10}) == {}
    assert commit_progress({0: 3}, {}, {0: 10}) == {}


def test_nothing_read_nothing_to_commit() -> None:
    assert commit_progress({0: 0}, {}, {}) == {}
    assert commit_progress({0: 5}, {0: {0}}, {}) == {}  # record 0 still running


def test_partitions_are_independent() -> None:
    next_offsets = {0: 10, 1: 20, 2: 5, 3: 8}
    outstanding = {0: {3}, 1: set(), 2: {2, 4}, 3: {1}}
    committed = {0: 1, 1: 20, 2: 0, 3: 4}
    # 0 moves to its outstanding record, 1 is already there, 2 moves to its first
    # outstanding one, 3 would go backwards: a record in one partition holds back no other.
    assert commit_progress(next_offsets, outstanding, committed) == {0: 3, 2: 2}
    assert commit_progress({0: 10, 1: 10}, {0: {1}}, {}) == {0: 1, 1: 10}


def test_commit_progress_changes_none_of_its_inputs() -> None:
    next_offsets, outstanding, committed = {0: 10}, {0: {4}}, {0: 2}
    commit_progress(next_offsets, outstanding, committed)
    assert (next_offsets, outstanding, committed) == ({0: 10}, {0: {4}}, {0: 2})


# --- after_crash ------------------------------------------------------------------------


def test_backoff_doubles_from_the_base_and_is_capped() -> None:
    delays = [after_crash(n, 100).retry_in_s for n in range(1, 9)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert not any(after_crash(n, 100).give_up for n in range(1, 9))


def test_backoff_with_another_base_and_cap() -> None:
    delays = [after_crash(n, 10, base_s=1.0, cap_s=3.0).retry_in_s for n in range(1, 5)]
    assert delays == pytest.approx([1.0, 2.0, 3.0, 3.0])


def test_gives_up_at_max_crashes() -> None:
    assert after_crash(2, 3) == CrashDecision(give_up=False, retry_in_s=pytest.approx(0.2))
    assert after_crash(3, 3).give_up
    assert after_crash(4, 3).give_up
    assert after_crash(1, 1).give_up  # a budget of one crash: the first one ends it


def test_a_position_claims_what_is_done_after_its_offset_and_keeps_what_it_was_told() -> None:
    # Read up to 10; 4 and 7 still running: the next member starts at 4 and
    # passes over 5, 6, 8, 9 (done here) but runs 4 and 7.
    position = position_of(10, {4, 7}, None)
    assert (position.offset, position.done_until, position.pending) == (4, 10, {4, 7})
    assert [o for o in range(12) if position.is_done(o)] == [5, 6, 8, 9]
    # Taken over at 4 with 5, 6, 8, 9 done before, given up again having read
    # only up to 6: the claim on 6, 8 and 9 is kept, 7 still runs next time.
    before = Position(4, 10, frozenset({4, 7}))
    later = position_of(6, {4}, before)
    assert [o for o in range(12) if later.is_done(o)] == [5, 6, 8, 9]
    assert position_of(6, set(), None) == Position(6, 6, frozenset())

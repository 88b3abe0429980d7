"""The cancel book: which requests a runtime must not start, or must stop."""

from __future__ import annotations

from mayfly.coordinator.sinks import outcome_records
from mayfly.errors import CoordinatorCrashedError, RequestCanceledError
from mayfly.events import RejectionCode, TaskCancel, rejection_for
from mayfly.runtime.cancels import CancelBook
from mayfly.topics import Topics


def test_a_cancel_names_its_request_and_every_shard_of_it() -> None:
    book = CancelBook()
    cancel = TaskCancel(request_id="r-1")
    assert book.add(cancel)
    assert not book.add(TaskCancel(request_id="r-1"))  # the first one stands
    assert book.of("r-1") is cancel
    assert book.of("r-1#shard-3") is cancel
    assert book.of("r-10") is None
    assert book.of("r-10#shard-0") is None
    assert book.of("r-1x#shard-0") is None


def test_a_long_ids_shards_are_found_by_their_shortened_prefix() -> None:
    from mayfly.events import new_request, shard_request

    long_id = "x" * 256
    request = new_request("reboot", devices=["a", "b"], request_id=long_id)
    shards = shard_request(request, ["a", "b"], 1, version="1.0.0")
    book = CancelBook()
    book.add(TaskCancel(request_id=long_id))
    assert all(book.of(shard.id) is not None for shard in shards)


def test_the_oldest_cancels_are_forgotten_past_the_limit() -> None:
    book = CancelBook(limit=2)
    for n in range(3):
        book.add(TaskCancel(request_id=f"r{n}"))
    assert len(book) == 2
    assert book.of("r0") is None
    assert book.of("r0#shard-1") is None
    assert book.of("r2") is not None


def test_a_cancel_before_the_start_is_an_outcome_not_a_dead_letter() -> None:
    topics = Topics("t")
    attributes = {"id": "r-1", "tasktype": "reboot"}
    canceled = rejection_for(RequestCanceledError("canceled before it started"), attributes)
    assert canceled.code is RejectionCode.CANCELED
    assert [r[0] for r in outcome_records(canceled, topics.results, topics.dead_letter)] == [
        topics.results
    ]
    crashed = rejection_for(CoordinatorCrashedError("crashed 3 times"), attributes)
    assert [r[0] for r in outcome_records(crashed, topics.results, topics.dead_letter)] == [
        topics.results,
        topics.dead_letter,
    ]

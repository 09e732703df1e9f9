"""QueueReader batching: results that trickle in are gathered into fuller receives; a backlog is read at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from hybrid_router.lambda_exec.results import Disposition, QueueReader

from .fakes import FakeSqs, client_error

QUEUE = "http://sqs.local/123456789012/results"


class CountingSqs(FakeSqs):
    """Counts the receives that returned messages, and how many each returned."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def receive_message(self, **kwargs: Any) -> dict[str, Any]:
        answer = super().receive_message(**kwargs)
        if answer.get("Messages"):
            self.batches.append(len(answer["Messages"]))
        return answer


def _read(sqs: CountingSqs, expected: int, gather_s: float, trickle_s: float | None) -> float:
    """Run a reader until it delivered ``expected`` messages; with ``trickle_s`` they arrive one at a time."""
    delivered: list[str] = []
    done = threading.Event()

    def classify(message: Any) -> Disposition:
        delivered.append(message.message_id)
        if len(delivered) == expected:
            done.set()
        return Disposition.DELIVER

    reader = QueueReader(
        name="test-reader",
        sqs=sqs,
        queue_url=QUEUE,
        classify=classify,
        is_active=lambda: True,
        wait_seconds=1,
        max_sightings=10,
        gather_s=gather_s,
    )
    if trickle_s is None:
        for i in range(expected):
            sqs.send(QUEUE, f"body-{i}")
    begin = time.monotonic()
    reader.start()
    try:
        if trickle_s is not None:
            for i in range(expected):
                sqs.send(QUEUE, f"body-{i}")
                time.sleep(trickle_s)
        assert done.wait(timeout=30), f"only {len(delivered)} of {expected} delivered"
    finally:
        reader.stop(flush=False, timeout=5)
    assert len(set(delivered)) == expected
    return time.monotonic() - begin


def test_trickling_results_are_gathered_into_fuller_receives():
    gathered, eager = CountingSqs(), CountingSqs()
    _read(gathered, expected=40, gather_s=0.1, trickle_s=0.02)
    _read(eager, expected=40, gather_s=0.0, trickle_s=0.02)
    # One message every 20 ms: without a pause nearly every receive carries one message; with a 0.1 s pause
    # after a partial batch, about five.
    assert sum(gathered.batches) == 40
    assert len(gathered.batches) <= 20, gathered.batches
    assert len(gathered.batches) < len(eager.batches) / 1.5, (gathered.batches, eager.batches)


def test_a_backlog_is_read_in_full_batches_without_pausing():
    sqs = CountingSqs()
    # A full batch means more may be waiting: no pause, so a long gather time must not slow the backlog down.
    elapsed = _read(sqs, expected=100, gather_s=5.0, trickle_s=None)
    assert sqs.batches == [10] * 10
    assert elapsed < 4.0


class VisibilityRecordingSqs(FakeSqs):
    def __init__(self) -> None:
        super().__init__()
        self.visibility: dict[str, int] = {}

    def change_message_visibility_batch(self, **kwargs: Any) -> dict[str, Any]:
        for entry in kwargs["Entries"]:
            self.visibility[entry["ReceiptHandle"]] = entry["VisibilityTimeout"]
        return super().change_message_visibility_batch(**kwargs)


def _delivering_reader(sqs: FakeSqs, delivered: list[str]) -> QueueReader:
    def classify(message: Any) -> Disposition:
        delivered.append(message.receipt_handle)
        return Disposition.DELIVER

    return QueueReader(
        name="test-reader",
        sqs=sqs,
        queue_url=QUEUE,
        classify=classify,
        is_active=lambda: True,
        wait_seconds=0,
        max_sightings=10,
    )


def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


@pytest.mark.parametrize("flush", [True, False])
def test_stop_makes_unacknowledged_deliveries_visible_again_at_once(flush):
    # A scheduler that stops before taking a delivered result must not hide it from the next owner for the
    # owned visibility timeout (minutes): the adopting executor reads it at once.
    sqs = VisibilityRecordingSqs()
    delivered: list[str] = []
    reader = _delivering_reader(sqs, delivered)
    for i in range(3):
        sqs.send(QUEUE, f"body-{i}")
    reader.start()
    try:
        _wait_for(lambda: len(delivered) == 3)
        if flush:
            reader.ack(delivered[:1])  # taken by the scheduler: deleted, at the latest when the reader stops
    finally:
        reader.stop(flush=flush, timeout=5)
    if flush:
        assert sqs.deleted == delivered[:1]
        assert sqs.visibility == {handle: 0 for handle in delivered[1:]}
    else:
        assert sqs.deleted == []
        assert sqs.visibility == {handle: 0 for handle in delivered}


def test_a_message_classify_fails_on_is_logged_once_and_deleted_after_bounded_sightings(caplog):
    # A malformed message is a MessageError, deleted by classify; should classify ever raise anything else,
    # the message must not circulate (and log a traceback) forever.
    sqs = FakeSqs(redeliver_released=True, visibility_scale=0.001)
    seen: list[int] = []

    def classify(message: Any) -> Disposition:
        seen.append(message.receive_count)
        raise TypeError("a bug in one message's handling")

    reader = QueueReader(
        name="test-reader",
        sqs=sqs,
        queue_url=QUEUE,
        classify=classify,
        is_active=lambda: True,
        wait_seconds=0,
        max_sightings=4,
        gather_s=0,
    )
    poison = sqs.send(QUEUE, "body")
    with caplog.at_level("INFO", logger="hybrid_router.lambda_exec.results"):
        reader.start()
        try:
            _wait_for(lambda: sqs.deleted)
            time.sleep(0.1)
        finally:
            reader.stop(timeout=5)
    assert sqs.deleted == [f"rh-{poison}"]
    assert seen == [1, 2, 3, 4]
    assert sqs.released == [f"rh-{poison}"] * 3
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and poison in tracebacks[0].getMessage()


class ExpiringSqs(FakeSqs):
    """Deletes fail (credentials expired) until ``renew()``; every other call works."""

    def __init__(self) -> None:
        super().__init__()
        self.expired = True
        self.failed_deletes = 0

    def delete_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        if self.expired:
            self.failed_deletes += 1
            raise client_error("ExpiredToken", 403, operation="DeleteMessageBatch")
        return super().delete_message_batch(**kwargs)


def test_a_failed_delete_is_tried_again_so_the_message_is_not_seen_again():
    # Dropped, the receipt handles would leave the messages hidden for the owned visibility timeout, then
    # classified (a malformed one logged) a second time; a message for another owner would wait as long.
    sqs = ExpiringSqs()
    seen: list[str] = []

    def classify(message: Any) -> Disposition:
        seen.append(message.body)
        return Disposition.RELEASE if message.body == "theirs" else Disposition.DELETE

    reader = QueueReader(
        name="test-reader",
        sqs=sqs,
        queue_url=QUEUE,
        classify=classify,
        is_active=lambda: True,
        wait_seconds=0,
        max_sightings=10,
        gather_s=0,
    )
    malformed = sqs.send(QUEUE, "malformed")
    theirs = sqs.send(QUEUE, "theirs")
    reader.start()
    try:
        _wait_for(lambda: sqs.failed_deletes >= 2)
        assert sqs.release_timeouts == [(f"rh-{theirs}", 0)]  # released at once all the same
        sqs.expired = False  # the credentials are fresh again
        _wait_for(lambda: sqs.deleted)
    finally:
        reader.stop(timeout=5)
    assert sqs.deleted == [f"rh-{malformed}"]
    assert seen == ["malformed", "theirs"]

"""A handler that cannot report STARTED: it keeps trying for a while, then stops the run and says why, so that
"no STARTED" means "not running" for the executor. A run shorter than the STARTED grace has nothing to stop."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from hybrid_router.lambda_exec import claim, started_notice
from hybrid_router.lambda_exec.handler import STARTED_GRACE_ENV, Sandbox, handle
from hybrid_router.lambda_exec.protocol import Outcome, Phase
from hybrid_router.lambda_exec.started_notice import StartedNotice

from .handler_support import (
    FakeCommand,
    FakeContext,
    make_event,
    make_sandbox,
    sealed,
    until_finished,
    wait_gone,
)

if TYPE_CHECKING:
    from moto_sqs import Moto

# What botocore raises once its own retries are spent on an endpoint that does not answer.
UNREACHABLE = EndpointConnectionError(endpoint_url="https://sqs.us-east-1.amazonaws.com/")
NO_SUCH_QUEUE = ClientError(
    {
        "Error": {"Code": "AWS.SimpleQueueService.NonExistentQueue", "Message": "no such queue"},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    },
    "SendMessage",
)


class StartedLost:
    """The sandbox's SQS client with its STARTED sends failing (the first ``failures`` of them, or all)."""

    def __init__(self, client: Any, failures: int | None = None):
        self._client = client
        self._failures = failures
        self.started_attempts = 0

    def send_message(self, **kwargs: Any) -> Any:
        payload = json.loads(json.loads(kwargs["MessageBody"])["payload"])
        if payload["phase"] == Phase.STARTED.value:
            self.started_attempts += 1
            if self._failures is None or self.started_attempts <= self._failures:
                raise UNREACHABLE
        return self._client.send_message(**kwargs)


def losing_started(sandbox: Sandbox, failures: int | None = None) -> StartedLost:
    lost = StartedLost(sandbox.sqs_client(), failures)
    sandbox._sqs = lost
    return lost


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(started_notice, "CONFIRM_WINDOW_S", 1.0)
    monkeypatch.setattr(started_notice, "FIRST_RETRY_DELAY_S", 0.1)


def test_a_run_that_cannot_report_started_is_stopped_and_says_so(
    results_queue: str, moto_server: Moto, tmp_path: Path, quick_retries: None
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0.2"}, workload_command=FakeCommand())
    lost = losing_started(sandbox)
    record = tmp_path / "record.json"
    # 20 s left: the deadline would stop the run only after 18 s.
    event = make_event(results_queue, {"sleep": 60, "record": str(record)})

    begin = time.monotonic()
    answer = handle(sealed(event), FakeContext(20), sandbox)
    elapsed = time.monotonic() - begin

    assert answer["status"] == Outcome.UNREPORTED.value
    # The grace (0.2 s), then tries for the 1 s confirmation window, then the stop (1 s grace at most).
    assert elapsed < 4.0
    assert lost.started_attempts >= 3
    # FINISHED alone: the executor takes it as an infrastructure failure of a run it never knew of.
    (finished,) = until_finished(moto_server, results_queue)
    assert finished.phase is Phase.FINISHED and finished.outcome is Outcome.UNREPORTED
    assert finished.outcome.is_infrastructure
    assert "STARTED could not be sent" in finished.detail
    pids = json.loads(record.read_text())
    assert wait_gone(pids["pid"]) and wait_gone(pids["grandchild"])


def test_started_that_goes_out_on_a_later_try_lets_the_run_finish(
    results_queue: str, moto_server: Moto, quick_retries: None
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0.2"}, workload_command=FakeCommand())
    lost = losing_started(sandbox, failures=2)

    answer = handle(sealed(make_event(results_queue, {"sleep": 1.5})), FakeContext(60), sandbox)

    assert answer == {"status": "success", "return_code": 0}
    assert lost.started_attempts == 3
    started, finished = until_finished(moto_server, results_queue)
    assert started.phase is Phase.STARTED and finished.outcome is Outcome.SUCCESS


def test_a_run_within_the_grace_is_not_stopped_for_a_started_it_never_needed(
    results_queue: str, moto_server: Moto, quick_retries: None
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "1.0"}, workload_command=FakeCommand())
    lost = losing_started(sandbox)

    answer = handle(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60), sandbox)

    assert answer == {"status": "success", "return_code": 0}
    assert lost.started_attempts == 0
    (finished,) = until_finished(moto_server, results_queue)
    assert finished.outcome is Outcome.SUCCESS


class FlakyReporter:
    def __init__(self, *errors: Exception):
        self.errors = list(errors)
        self.calls = 0

    def send(self, phase: Phase, *, started_at: float, claimed: bool = False) -> None:
        assert phase is Phase.STARTED and claimed
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


def wait_unconfirmed(notice: StartedNotice, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not notice.unconfirmed():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_refusal_that_will_not_change_stops_the_run_after_one_try(quick_retries: None) -> None:
    reporter = FlakyReporter(NO_SUCH_QUEUE, NO_SUCH_QUEUE)
    notice = StartedNotice(reporter, time.time(), 0.05)
    notice.arm()
    try:
        assert wait_unconfirmed(notice, timeout=0.8)  # well within the 1 s window: no waiting it out
        assert reporter.calls == 1
    finally:
        notice.settle()


def test_the_confirmation_window_ends_at_the_events_not_after() -> None:
    now = time.time()
    notice = StartedNotice(FlakyReporter(), now, 0.5, not_after=now + 2.0)
    assert notice.confirm_by == now + 2.0
    later = StartedNotice(FlakyReporter(), now, 0.5, not_after=now + 600.0)
    assert later.confirm_by == now + 0.5 + started_notice.CONFIRM_WINDOW_S


def test_with_no_grace_started_is_tried_again_before_anything_runs(quick_retries: None) -> None:
    reporter = FlakyReporter(UNREACHABLE, UNREACHABLE)
    notice = StartedNotice(reporter, time.time(), 0)
    notice.arm()
    assert notice.sent and reporter.calls == 3 and not notice.unconfirmed()

    refused = StartedNotice(FlakyReporter(NO_SUCH_QUEUE), time.time(), 0)
    with pytest.raises(ClientError):
        refused.arm()


def test_started_waits_for_the_claim_and_a_refused_run_is_never_unconfirmed(quick_retries: None) -> None:
    answer: list[str] = []
    reporter = FlakyReporter()
    notice = StartedNotice(reporter, time.time(), 0.05, claim=lambda: answer[0] if answer else None)
    notice.arm()
    try:
        time.sleep(0.4)
        assert reporter.calls == 0 and not notice.unconfirmed()  # past the grace, but not claimed yet
        answer.append(claim.CLAIMED)
        deadline = time.monotonic() + 2
        while not notice.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert notice.sent and reporter.calls == 1
    finally:
        notice.settle()

    # A copy refused by /run: no STARTED, even one that cannot be sent, and never stopped as unreported.
    failing = FlakyReporter(*[UNREACHABLE] * 10)
    refused = StartedNotice(failing, time.time(), 0.05, claim=lambda: claim.REFUSED)
    refused.arm()
    try:
        time.sleep(1.5)  # past the grace and the 1 s confirmation window
        assert failing.calls == 0 and not refused.unconfirmed()
    finally:
        refused.settle()


def test_a_run_whose_claim_never_comes_is_stopped_as_unreported(
    results_queue: str, moto_server: Moto, tmp_path: Path, quick_retries: None
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0.2"}, workload_command=FakeCommand())
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"claim": "none", "sleep": 60, "record": str(record)})

    begin = time.monotonic()
    answer = handle(sealed(event), FakeContext(20), sandbox)

    assert answer["status"] == Outcome.UNREPORTED.value
    assert time.monotonic() - begin < 4.0  # the grace, the 1 s window, the stop
    (finished,) = until_finished(moto_server, results_queue)  # no STARTED: it never held the task, as known
    assert finished.outcome is Outcome.UNREPORTED and not finished.claimed
    pids = json.loads(record.read_text())
    assert wait_gone(pids["pid"]) and wait_gone(pids["grandchild"])

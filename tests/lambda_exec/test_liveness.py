"""Positive signs of death (issue 9, "Nothing relies on a message arriving"): a run's heartbeat stopping while
the results queue is read ends its dispatch well before the function's timeout, and a run whose results are
only delayed (a receive outage, a backlog) is never declared dead."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from airflow.utils.state import TaskInstanceState

from devtools.workloads import make_workload
from hybrid_router.lambda_exec import liveness, protocol, started_notice
from hybrid_router.lambda_exec.config import LambdaConfigError, LambdaExecutorConfig
from hybrid_router.lambda_exec.dispatch import Dispatch, DispatchState
from hybrid_router.lambda_exec.handler import STARTED_GRACE_ENV, handle
from hybrid_router.lambda_exec.inbox import Reads
from hybrid_router.lambda_exec.protocol import InvokeEvent, MessageError, Outcome, Phase, ResultMessage
from hybrid_router.lambda_exec.results import Disposition, QueueReader
from hybrid_router.lambda_exec.started_notice import StartedNotice

from . import test_executor_unit as unit
from .executor_support import SECRET, drive
from .fakes import FakeClock, FakeLambda, FakeSqs
from .handler_support import (
    FakeCommand,
    FakeContext,
    make_event,
    make_sandbox,
    sealed,
    until_finished,
    wait_gone,
)
from .test_config import REQUIRED, FakeConf
from .test_executor_unit import RESULTS, invoke_and_accept
from .test_run_binding import FlakySqs

if TYPE_CHECKING:
    from moto_sqs import Moto

started = unit.started  # the fixture: an executor on the fakes, terminated after the test

RUN_A = "a" * 32
RUN_B = "b" * 32
HEARTBEAT_S = 10.0
LEASE_S = liveness.LEASE_HEARTBEATS * HEARTBEAT_S


def started_message(event: InvokeEvent, run_id: str, *, lease_s: float = LEASE_S) -> str:
    now = time.time()
    message = ResultMessage(
        phase=Phase.STARTED,
        dispatch_id=event.dispatch_id,
        task=event.task,
        sent_at=now,
        started_at=now,
        request_id="req-1",
        run_id=run_id,
        claimed=True,
        lease_s=lease_s,
    )
    return protocol.seal_result(message, protocol.result_key(SECRET, event.dispatch_id))


def state_of(events: dict[Any, Any], key: Any) -> Any:
    return events.get(key, (None,))[0]


def beat(executor: Any, times: int = 5) -> dict[Any, Any]:
    """Heartbeat a few times in real time (the reader threads read meanwhile); the events reported."""
    events: dict[Any, Any] = {}
    for _ in range(times):
        executor.heartbeat()
        events.update(executor.get_event_buffer())
        time.sleep(0.03)
    return events


def running_on_lambda(
    started: Any, sqs: FakeSqs | None = None, lease_s: float = LEASE_S, **options: Any
) -> tuple[Any, ...]:
    """An executor whose function times out after 15 min, with one task whose run A reported STARTED."""
    clock = FakeClock(time.time())
    executor, lambda_, sqs = started(
        lambda_=FakeLambda(timeout_s=900), sqs=sqs, clock=clock, run_heartbeat_seconds=HEARTBEAT_S, **options
    )
    workload = make_workload("long")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    sqs.send(RESULTS, started_message(event, RUN_A, lease_s=lease_s))
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.RUNNING)
    return executor, sqs, clock, event, key


# -- the executor ------------------------------------------------------------------------------------------------


def test_a_killed_sandbox_is_dead_once_its_heartbeat_stops_not_at_the_function_timeout(started):
    executor, sqs, clock, event, key = running_on_lambda(started)
    assert (event.heartbeat_s, event.lease_s) == (HEARTBEAT_S, LEASE_S)
    # Alive: a STARTED every heartbeat keeps renewing the lease, far past the first one.
    for _ in range(6):
        clock.advance(HEARTBEAT_S)
        sqs.send(RESULTS, started_message(event, RUN_A))
        assert state_of(beat(executor), key) is None
    # The sandbox dies without a word: nothing until the lease and the grace have run out here.
    clock.advance(LEASE_S + liveness.LEASE_GRACE_S - 1)
    assert state_of(beat(executor), key) is None
    clock.advance(2)
    events = drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.FAILED)
    assert "runtime_crash" in events[key][1]
    failure = executor.pop_infrastructure_failure(key)
    assert failure.reason == Outcome.RUNTIME_CRASH.value
    assert f"no heartbeat from run {RUN_A}" in failure.detail
    # 60 s of heartbeats + 36 s of silence: the function's 900 s timeout is nowhere near.
    assert clock.now - event.issued_at < 120


def test_a_receive_outage_delays_the_verdict_and_the_delayed_heartbeats_keep_the_run(started):
    sqs = FlakySqs()
    executor, sqs, clock, event, key = running_on_lambda(started, sqs=sqs)
    sqs.broken = True
    # The run goes on sending its heartbeats; none can be read, for ten times its lease.
    for _ in range(30):
        clock.advance(HEARTBEAT_S)
        sqs.send(RESULTS, started_message(event, RUN_A))
    assert state_of(beat(executor, 10), key) is None
    assert executor.pop_infrastructure_failure(key) is None
    sqs.broken = False  # the first receives deliver the backlog: the run is alive
    dispatch = executor._dispatches[key]
    events = drive(executor, lambda ev: dispatch.renewed_at == clock.now)
    events.update(beat(executor, 10))
    assert state_of(events, key) is None
    assert executor.pop_infrastructure_failure(key) is None
    assert executor._dispatches[key] is dispatch


def test_a_run_that_promises_no_lease_is_left_to_the_watchdog(started):
    """A handler older than leases: its STARTED carries none, so its silence means nothing before the bound."""
    executor, _, clock, _, key = running_on_lambda(started, lease_s=0)
    assert executor._dispatches[key].renewed_at is None
    clock.advance(LEASE_S * 5)
    assert state_of(beat(executor), key) is None
    clock.advance(900 + liveness.WATCHDOG_GRACE_S)
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.FAILED)
    assert executor.pop_infrastructure_failure(key).reason == Outcome.TIMEOUT.value


def test_another_runs_heartbeat_does_not_keep_the_bound_run_alive(started):
    executor, sqs, clock, event, key = running_on_lambda(started)
    for _ in range(3):
        clock.advance(HEARTBEAT_S)
        sqs.send(RESULTS, started_message(event, RUN_B))  # a duplicate copy's, ignored
        assert state_of(beat(executor), key) is None
    clock.advance(liveness.LEASE_GRACE_S + 1)
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.FAILED)
    assert executor.pop_infrastructure_failure(key).reason == Outcome.RUNTIME_CRASH.value


def test_heartbeats_off_ask_for_no_lease(started):
    executor, lambda_, _ = started(run_heartbeat_seconds=0)
    event, _ = invoke_and_accept(executor, lambda_, make_workload("quiet"))
    assert (event.heartbeat_s, event.lease_s) == (0, 0)


def test_only_an_empty_receive_after_the_lease_lets_its_silence_count():
    """A receive that worked but came back full may have left the run's STARTED behind."""
    dispatch = Dispatch(key=None, dispatch_id="d", workload_json=None, state=DispatchState.STARTED)  # type: ignore[arg-type]
    dispatch.started_at, dispatch.not_after, dispatch.run_id = 1000.0, 1300.0, RUN_A
    dispatch.lease_s, dispatch.renewed_at = LEASE_S, 1000.0
    deadline = 1000.0 + LEASE_S + liveness.LEASE_GRACE_S
    now = deadline + 60
    assert liveness.death(dispatch, now, 900, Reads(ok_at=now, drained_at=deadline - 1)) is None
    assert liveness.death(dispatch, now, 900, Reads(ok_at=now, drained_at=None)) is None
    outcome, detail = liveness.death(dispatch, now, 900, Reads(ok_at=now, drained_at=deadline))
    assert outcome is Outcome.RUNTIME_CRASH and "while its results were read" in detail


def test_the_reader_says_when_a_receive_came_back_empty():
    sqs = FakeSqs()
    clock = FakeClock()
    reader = QueueReader(
        name="t",
        sqs=sqs,
        queue_url=RESULTS,
        classify=lambda message: Disposition.DELETE,
        is_active=lambda: True,
        wait_seconds=0,
        max_sightings=10,
        clock=clock,
    )
    sqs.send(RESULTS, "a body")
    reader._poll_once()
    assert reader.receive_ok_at == clock.now and reader.drained_at is None
    clock.advance(5)
    reader._poll_once()
    assert reader.drained_at == clock.now


def test_the_heartbeat_setting_is_checked():
    conf = FakeConf(REQUIRED)
    assert LambdaExecutorConfig.load(conf).run_heartbeat_seconds == 30
    assert LambdaExecutorConfig.load(conf, {"run_heartbeat_seconds": "0"}).run_heartbeat_seconds == 0
    for bad in (1, 301, -2):
        with pytest.raises(LambdaConfigError, match="run_heartbeat_seconds"):
            LambdaExecutorConfig.load(conf, {"run_heartbeat_seconds": bad})


# -- the wire ----------------------------------------------------------------------------------------------------


def test_events_and_results_carry_the_lease_and_older_ones_mean_none():
    event = make_event("q", {})
    leased = dataclasses.replace(event, heartbeat_s=10.0, lease_s=30.0)
    assert protocol.read_event(sealed(leased)).lease_s == 30.0
    assert protocol.read_event(sealed(event)).heartbeat_s == 0.0  # an executor older than leases asks nothing
    for heartbeat_s, lease_s in ((10.0, 10.0), (0.0, 30.0), (10.0, 0.0), (-1.0, 3.0)):
        payload = json.loads(
            sealed(dataclasses.replace(event, heartbeat_s=heartbeat_s, lease_s=lease_s))["payload"]
        )
        with pytest.raises(MessageError):
            InvokeEvent.from_payload(payload)
    result = json.loads(started_message(leased, RUN_A))
    assert protocol.open_result(json.dumps(result), SECRET).lease_s == LEASE_S
    payload = json.loads(result["payload"])
    del payload["lease_s"]
    assert ResultMessage.from_payload(payload).lease_s == 0.0  # a handler older than leases promises none


# -- the handler -------------------------------------------------------------------------------------------------


class Reporter:
    """Records STARTED sends; fails every one from ``fail_from`` on (1-based)."""

    def __init__(self, fail_from: int | None = None):
        self.sent: list[float] = []
        self.fail_from = fail_from

    def send(self, phase: Phase, *, started_at: float, claimed: bool = False) -> None:
        assert phase is Phase.STARTED and claimed
        if self.fail_from is not None and len(self.sent) + 1 >= self.fail_from:
            raise ConnectionError("SQS unreachable")
        self.sent.append(time.monotonic())


@pytest.fixture
def short_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop that takes 0.05 s (the real one allows ~2 s), so that leases of a second can be tested."""
    monkeypatch.setattr(started_notice, "LEASE_STOP_S", 0.05)
    monkeypatch.setattr(started_notice, "FIRST_RETRY_DELAY_S", 0.05)


def test_started_is_sent_again_every_heartbeat_and_the_lease_holds(short_stop: None) -> None:
    reporter = Reporter()
    notice = StartedNotice(reporter, time.time(), 0, heartbeat_s=0.1, lease_s=0.3)
    notice.arm()
    try:
        time.sleep(0.75)
        assert not notice.unconfirmed()
    finally:
        notice.settle()
    assert 6 <= len(reporter.sent) <= 9
    gaps = [b - a for a, b in zip(reporter.sent, reporter.sent[1:], strict=False)]
    assert all(0.08 < gap < 0.25 for gap in gaps), gaps
    count = len(reporter.sent)
    time.sleep(0.25)
    assert len(reporter.sent) == count  # settled: no send after the run's end


def test_a_run_that_cannot_renew_its_lease_must_stop_before_it_ends(short_stop: None) -> None:
    reporter = Reporter(fail_from=2)  # STARTED goes out, no heartbeat after it does
    notice = StartedNotice(reporter, time.time(), 0, heartbeat_s=0.1, lease_s=0.4)
    notice.arm()
    try:
        first = reporter.sent[0]
        while not notice.unconfirmed():
            assert time.monotonic() - first < 1.0
            time.sleep(0.005)
        stopped_at = time.monotonic() - first
    finally:
        notice.settle()
    # Counted from the start of the last send that worked: by the end of the lease the run has stopped.
    assert 0.4 - 0.05 - 0.02 <= stopped_at <= 0.4 - 0.05 + 0.05, stopped_at


def test_no_lease_no_heartbeat(short_stop: None) -> None:
    reporter = Reporter()
    notice = StartedNotice(reporter, time.time(), 0)
    notice.arm()
    time.sleep(0.3)
    assert len(reporter.sent) == 1 and not notice.unconfirmed()
    notice.settle()


def test_the_handler_sends_its_heartbeats_with_the_lease(results_queue: str, moto_server: Moto) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0.1"}, workload_command=FakeCommand())
    event = dataclasses.replace(make_event(results_queue, {"sleep": 2.0}), heartbeat_s=0.4, lease_s=3.2)

    answer = handle(sealed(event), FakeContext(60), sandbox)

    assert answer == {"status": "success", "return_code": 0}
    *beats, finished = until_finished(moto_server, results_queue)
    assert finished.outcome is Outcome.SUCCESS and finished.lease_s == 0
    assert len(beats) >= 3 and {b.phase for b in beats} == {Phase.STARTED}
    assert {b.lease_s for b in beats} == {3.2} and {b.run_id for b in beats} == {finished.run_id}


class RenewalsLost:
    """The sandbox's SQS client with every STARTED after the first failing: the network to SQS went away."""

    def __init__(self, client: Any):
        self._client = client
        self.started = 0

    def send_message(self, **kwargs: Any) -> Any:
        payload = json.loads(json.loads(kwargs["MessageBody"])["payload"])
        if payload["phase"] == Phase.STARTED.value:
            self.started += 1
            if self.started > 1:
                raise ConnectionError("SQS unreachable")
        return self._client.send_message(**kwargs)


def test_a_run_whose_heartbeats_cannot_be_sent_stops_itself_within_its_lease(
    results_queue: str, moto_server: Moto, tmp_path: Path, short_stop: None
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0.1"}, workload_command=FakeCommand())
    sandbox._sqs = lost = RenewalsLost(sandbox.sqs_client())
    record = tmp_path / "record.json"
    event = dataclasses.replace(
        make_event(results_queue, {"sleep": 60, "record": str(record)}), heartbeat_s=0.3, lease_s=1.2
    )

    begin = time.monotonic()
    answer = handle(sealed(event), FakeContext(60), sandbox)
    elapsed = time.monotonic() - begin

    assert answer["status"] == Outcome.UNREPORTED.value
    # The grace, then the lease (from STARTED's send), then the stop (the task's 1 s SIGTERM grace at most).
    assert elapsed < 0.1 + 1.2 + 1.5, elapsed
    assert lost.started >= 3  # the heartbeats were tried
    started_msg, finished = until_finished(moto_server, results_queue)
    assert started_msg.phase is Phase.STARTED and finished.outcome is Outcome.UNREPORTED
    assert "within its lease" in finished.detail
    pids = json.loads(record.read_text())
    assert wait_gone(pids["pid"]) and wait_gone(pids["grandchild"])

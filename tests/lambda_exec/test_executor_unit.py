"""The LambdaExecutor against scripted boto clients and a fake clock: message handling, throttling, adoption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from airflow.utils.state import TaskInstanceState
from botocore.exceptions import NoCredentialsError

from devtools.workloads import make_workload
from hybrid_router.child_protocol import FunctionLimits
from hybrid_router.lambda_exec import executor as executor_module
from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.config import LambdaConfigError
from hybrid_router.lambda_exec.executor import LambdaExecutor, LambdaHealthError
from hybrid_router.lambda_exec.external_id import lambda_external_id, parse_lambda_external_id
from hybrid_router.lambda_exec.protocol import Outcome, Phase, ResultMessage, TaskRef
from hybrid_router.lambda_exec.shared_readers import SharedQueues

from .executor_support import SECRET, drive
from .fakes import FakeClock, FakeLambda, FakeSqs, client_error, fake_clients

RESULTS = "http://sqs.local/results"
DLQ = "http://sqs.local/dlq"


def make_executor(lambda_=None, sqs=None, clock=None, **options):
    lambda_ = lambda_ or FakeLambda()
    sqs = sqs or FakeSqs()
    opts = {
        "function_name": "airflow-task",
        "results_queue_url": RESULTS,
        "dead_letter_queue_url": DLQ,
        "signing_secret": SECRET,
        "aws_conn_id": "",
        "max_invoke_workers": 4,
        "poll_wait_seconds": 0,
        **options,
    }
    executor = LambdaExecutor(
        parallelism=16, clock=clock or time.time, clients=fake_clients(lambda_, sqs), **opts
    )
    return executor, lambda_, sqs


@pytest.fixture
def started():
    created = []

    def factory(**kwargs):
        executor, lambda_, sqs = make_executor(**kwargs)
        executor.start()
        created.append(executor)
        return executor, lambda_, sqs

    yield factory
    for executor in created:
        executor.terminate()


def sent_event(lambda_: FakeLambda, index: int = -1) -> protocol.InvokeEvent:
    return protocol.open_event(lambda_.invokes[index]["Payload"].decode(), SECRET.encode())


def result(
    event: protocol.InvokeEvent,
    phase: Phase,
    outcome: Outcome | None = None,
    *,
    now=None,
    secret=SECRET,
    request_id="req-1",
    detail="",
    run_id="",
    claimed=False,
) -> str:
    now = time.time() if now is None else now
    message = ResultMessage(
        phase=phase,
        dispatch_id=event.dispatch_id,
        task=event.task,
        sent_at=now,
        started_at=now,
        outcome=outcome,
        return_code=None if outcome is None else (0 if outcome is Outcome.SUCCESS else 1),
        request_id=request_id,
        function_name="airflow-task",
        detail=detail,
        run_id=run_id,
        claimed=claimed,
    )
    return protocol.seal_result(message, protocol.result_key(secret, event.dispatch_id))


def accepted(events, key) -> bool:
    """Whether Lambda's answer to the invoke of ``key`` is in: its QUEUED id then names the request."""
    state, info = events.get(key, (None, None))
    return state == TaskInstanceState.QUEUED and bool(parse_lambda_external_id(info).request_id)


def states(events) -> dict:
    return {key: state for key, (state, _) in events.items()}


def invoke_and_accept(executor, lambda_, workload):
    executor.queue_workload(workload, session=None)
    events = drive(executor, lambda ev: accepted(ev, workload.ti.key))
    return sent_event(lambda_), events[workload.ti.key][1]


# -- external ids ------------------------------------------------------------------------------------------------


def test_external_id_round_trip_with_arn():
    arn = "arn:aws:lambda:us-east-1:123456789012:function:airflow-task"
    value = lambda_external_id(arn, "a-b-c", "d1")
    assert value.startswith(f"lambda:{arn}:")
    assert parse_lambda_external_id(value) == (arn, "a-b-c", "d1", "")
    assert parse_lambda_external_id("lambda:fn:-:d2") == ("fn", "", "d2", "")  # the format before run ids
    with_run = lambda_external_id(arn, "a-b-c", "d1", "r1")
    assert with_run == f"lambda:{arn}:a-b-c:d1+r1"
    assert parse_lambda_external_id(with_run) == (arn, "a-b-c", "d1", "r1")
    assert parse_lambda_external_id("celery-task-id") is None
    assert parse_lambda_external_id(None) is None


# -- the happy path and the task's own outcomes ------------------------------------------------------------------


def test_success_flow_events_and_batch_deletes(started):
    executor, lambda_, sqs = started()
    workload = make_workload("ok")
    key = workload.ti.key
    event, queued_info = invoke_and_accept(executor, lambda_, workload)
    assert lambda_.invokes[0]["InvocationType"] == "Event"
    assert event.task == TaskRef(*key)
    assert json.loads(event.workload)["ti"]["task_id"] == "ok"
    assert event.not_after - event.issued_at == 300
    assert parse_lambda_external_id(queued_info)[2] == event.dispatch_id
    assert executor.has_task(SimpleNamespace(id=workload.ti.id, key=key))

    sqs.send(RESULTS, result(event, Phase.STARTED, request_id="req-9"))
    events = drive(executor, lambda ev: ev.get(key, (None,))[0] == TaskInstanceState.RUNNING)
    assert events[key][1] == f"lambda:airflow-task:req-9:{event.dispatch_id}"

    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.SUCCESS))
    events = drive(executor, lambda ev: ev.get(key, (None,))[0] == TaskInstanceState.SUCCESS)
    assert key not in executor.running
    assert executor.pop_infrastructure_failure(key) is None
    # Delivered messages are deleted one heartbeat later, in batches.
    drive(executor, lambda ev: len(sqs.deleted) == 2)


def test_finished_without_started_reports_running_then_the_final_state(started, monkeypatch):
    # A run shorter than the handler's STARTED grace sends FINISHED alone.
    executor, lambda_, sqs = started()
    workload = make_workload("quick")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    changes = []
    original = executor.change_state

    def recording(key, state, info=None, remove_running=True):
        changes.append((key, state, info))
        original(key, state, info, remove_running=remove_running)

    monkeypatch.setattr(executor, "change_state", recording)
    dispatch = executor._dispatches[key]
    run_started = time.time() - 0.2
    message = ResultMessage(
        phase=Phase.FINISHED,
        dispatch_id=event.dispatch_id,
        task=event.task,
        sent_at=run_started + 0.2,
        started_at=run_started,
        outcome=Outcome.SUCCESS,
        return_code=0,
        request_id="req-7",
        function_name="airflow-task",
    )
    sqs.send(RESULTS, protocol.seal_result(message, protocol.result_key(SECRET, event.dispatch_id)))
    drive(executor, lambda ev: ev.get(key, (None,))[0] == TaskInstanceState.SUCCESS)

    assert [(state, info) for _, state, info in changes] == [
        (TaskInstanceState.RUNNING, f"lambda:airflow-task:req-7:{event.dispatch_id}"),
        (TaskInstanceState.SUCCESS, None),
    ]
    assert dispatch.started_at == run_started
    assert key not in executor.running
    drive(executor, lambda ev: len(sqs.deleted) == 1)


def test_every_result_received_before_a_heartbeat_is_reported_by_that_heartbeat_and_the_next(started):
    # RUNNING (with the run's id) in the first heartbeat, the final state in the next: the scheduler's event
    # buffer keeps one event per task, and the run's id must reach the task instance.
    executor, lambda_, sqs = started()
    loads = [make_workload(f"t{i}") for i in range(12)]
    for workload in loads:
        executor.queue_workload(workload, session=None)
    drive(executor, lambda ev: len(lambda_.invokes) == len(loads))
    for i in range(len(loads)):
        sqs.send(RESULTS, result(sent_event(lambda_, i), Phase.FINISHED, Outcome.SUCCESS))
    deadline = time.monotonic() + 5
    while len(executor._inbox) < len(loads):  # all handed over by the reader thread
        assert time.monotonic() < deadline, "the reader did not deliver the results"
        time.sleep(0.01)

    executor.heartbeat()
    events = executor.get_event_buffer()
    assert {events[w.ti.key][0] for w in loads} == {TaskInstanceState.RUNNING}
    assert all(executor.has_task(SimpleNamespace(id=w.ti.id, key=w.ti.key)) for w in loads)

    executor.heartbeat()
    events = executor.get_event_buffer()
    assert {events[w.ti.key][0] for w in loads} == {TaskInstanceState.SUCCESS}


def test_a_success_is_deleted_at_once_and_other_results_after_the_scheduler_took_them(started):
    executor, lambda_, sqs = started()
    ok, bad = make_workload("ok"), make_workload("bad")
    for workload in (ok, bad):
        executor.queue_workload(workload, session=None)
    drive(executor, lambda ev: len(lambda_.invokes) == 2)
    by_task = {sent_event(lambda_, i).task.task_id: sent_event(lambda_, i) for i in range(2)}
    success = sqs.send(RESULTS, result(by_task["ok"], Phase.FINISHED, Outcome.SUCCESS))
    failure = sqs.send(RESULTS, result(by_task["bad"], Phase.FINISHED, Outcome.FAILED))
    deadline = time.monotonic() + 5
    while len(executor._inbox) < 2 or not sqs.deleted:
        assert time.monotonic() < deadline, "the reader did not deliver the results"
        time.sleep(0.01)
    # No heartbeat yet: the SUCCESS (already recorded by the task itself) is gone, the failure waits.
    assert sqs.deleted == [f"rh-{success}"]

    executor.heartbeat()  # takes both messages: RUNNING now, the final states a heartbeat later
    time.sleep(0.2)
    assert sqs.deleted == [f"rh-{success}"]
    executor.heartbeat()
    events = executor.get_event_buffer()
    assert events[ok.ti.key][0] == TaskInstanceState.SUCCESS
    assert events[bad.ti.key][0] == TaskInstanceState.FAILED
    drive(executor, lambda ev: f"rh-{failure}" in sqs.deleted)
    assert sorted(sqs.deleted) == sorted([f"rh-{success}", f"rh-{failure}"])  # each deleted once


def test_expired_event_alone_is_not_reported_as_running(started, monkeypatch):
    clock = FakeClock(time.time())
    executor, lambda_, sqs = started(clock=clock)
    workload = make_workload("late")
    event, _ = invoke_and_accept(executor, lambda_, workload)
    states = []
    monkeypatch.setattr(executor, "running_state", lambda key, info=None: states.append(info))
    clock.advance(301)
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.EVENT_EXPIRED, detail="late", now=clock.now))
    drive(executor, lambda ev: len(executor._inbox) == 0 and sqs.deleted)
    # A copy that came too late says no copy can start a run any more; one that claimed before not_after has
    # reported STARTED by then: the dispatch expires after the grace, not the function's timeout.
    clock.advance(16)
    drive(executor, lambda ev: ev.get(workload.ti.key, (None,))[0] == TaskInstanceState.FAILED)
    assert states == []
    assert executor.pop_infrastructure_failure(workload.ti.key).reason == "event_expired"


def test_task_failure_is_an_ordinary_failure(started):
    executor, lambda_, sqs = started()
    workload = make_workload("boom")
    event, _ = invoke_and_accept(executor, lambda_, workload)
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.FAILED))
    events = drive(executor, lambda ev: ev.get(workload.ti.key, (None,))[0] == TaskInstanceState.FAILED)
    assert "return code 1" in events[workload.ti.key][1]
    assert executor.pop_infrastructure_failure(workload.ti.key) is None


def test_handler_timeout_is_an_infrastructure_failure_popped_once(started):
    executor, lambda_, sqs = started()
    workload = make_workload("slow")
    event, _ = invoke_and_accept(executor, lambda_, workload)
    sqs.send(
        RESULTS, result(event, Phase.FINISHED, Outcome.TIMEOUT, detail="stopped 5.0s before the deadline")
    )
    events = drive(executor, lambda ev: ev.get(workload.ti.key, (None,))[0] == TaskInstanceState.FAILED)
    assert events[workload.ti.key][1].startswith("lambda infrastructure failure: timeout")
    failure = executor.pop_infrastructure_failure(workload.ti.key)
    assert failure.reason == "timeout" and "deadline" in failure.detail
    assert failure.executor == "lambda:airflow-task"
    assert executor.pop_infrastructure_failure(workload.ti.key) is None


def test_a_run_stopped_for_an_unsendable_started_is_an_infrastructure_failure(started):
    executor, lambda_, sqs = started()
    workload = make_workload("unreported")
    event, _ = invoke_and_accept(executor, lambda_, workload)
    # FINISHED alone: the handler never got STARTED out, so it stopped the task.
    sqs.send(
        RESULTS, result(event, Phase.FINISHED, Outcome.UNREPORTED, detail="its STARTED could not be sent")
    )
    drive(executor, lambda ev: ev.get(workload.ti.key, (None,))[0] == TaskInstanceState.FAILED)
    failure = executor.pop_infrastructure_failure(workload.ti.key)
    assert failure.reason == "unreported" and "STARTED" in failure.detail


@pytest.mark.parametrize(
    ("code", "message", "reason"),
    [
        ("Unhandled", "2026-01-01T00:00:00Z abc Task timed out after 5.00 seconds", "timeout"),
        (
            "Unhandled",
            "RequestId: x Error: Runtime exited with error: signal: killed Runtime.OutOfMemory",
            "out_of_memory",
        ),
        (
            "Unhandled",
            "RequestId: x Error: Runtime exited with error: exit status 1 Runtime.ExitError",
            "runtime_crash",
        ),
        ("429", "Event age exceeded the function's MaximumEventAgeInSeconds (60 s)", "event_expired"),
        ("200", "Event age exceeded (60 s); last error: Task timed out after 5.00 seconds", "timeout"),
        ("200", "Runtime exited with error: signal: killed", "out_of_memory"),
        ("", "", "dead_lettered"),
    ],
)
def test_dead_letters_are_classified(started, code, message, reason):
    executor, lambda_, sqs = started()
    workload = make_workload("dl")
    _event, _ = invoke_and_accept(executor, lambda_, workload)
    body = lambda_.invokes[0]["Payload"].decode()  # AWS puts the original event in the DLQ message's body
    sqs.send(DLQ, body, attributes={"RequestID": "req-dl", "ErrorCode": code, "ErrorMessage": message})
    drive(executor, lambda ev: ev.get(workload.ti.key, (None,))[0] == TaskInstanceState.FAILED)
    assert executor.pop_infrastructure_failure(workload.ti.key).reason == reason


# -- messages that must change nothing ---------------------------------------------------------------------------


def test_forged_malformed_and_foreign_messages_change_nothing(started, monkeypatch):
    counted = []
    from airflow.sdk.observability.stats import Stats

    monkeypatch.setattr(Stats, "incr", lambda name, *a, **k: counted.append(name))
    executor, lambda_, sqs = started(stale_after_sightings=5, unowned_message_max_age=3600)
    workload = make_workload("victim")
    event, _ = invoke_and_accept(executor, lambda_, workload)
    forged = sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.SUCCESS, secret="not-the-secret"))
    garbage = sqs.send(RESULTS, "{not json eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.abc")
    unsigned = sqs.send(RESULTS, json.dumps({"v": 1, "payload": "{}"}))
    other = protocol.InvokeEvent(**{**event.__dict__, "dispatch_id": "someone-elses"})
    foreign = sqs.send(RESULTS, result(other, Phase.FINISHED, Outcome.SUCCESS))
    # Seen by many readers, but young: its owner (another scheduler, or an adopter) may still come for it.
    often_seen = sqs.send(RESULTS, result(other, Phase.FINISHED, Outcome.SUCCESS), receive_count=13)
    # In SQS for longer than unowned_message_max_age: no owner can come for it any more.
    stale = sqs.send(RESULTS, result(other, Phase.FINISHED, Outcome.SUCCESS), sent_at=time.time() - 3601)
    forged_dlq = sqs.send(DLQ, "{}", attributes={"ErrorMessage": "Task timed out after 5.00 seconds"})

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(sqs.deleted) < 5:
        executor.heartbeat()
        time.sleep(0.02)
    assert sorted(sqs.deleted) == sorted(f"rh-{m}" for m in (forged, garbage, unsigned, stale, forged_dlq))
    # Left for their owner: visible again at once, or after a few seconds for one released many times.
    assert sorted(sqs.release_timeouts) == [(f"rh-{foreign}", 0), (f"rh-{often_seen}", 4)]
    assert executor.get_event_buffer() == {}
    assert workload.ti.key in executor.running
    assert counted.count("lambda_executor.malformed_message") == 4
    assert counted.count("lambda_executor.stale_message") == 1


def test_result_of_an_old_dispatch_is_ignored(started):
    executor, lambda_, sqs = started()
    workload = make_workload("moved")
    old_event, _ = invoke_and_accept(executor, lambda_, workload)
    executor.revoke_task(ti=SimpleNamespace(key=workload.ti.key))
    assert workload.ti.key not in executor.running
    # Another task keeps the reader polling (an idle executor does not read its queues).
    invoke_and_accept(executor, lambda_, make_workload("keeps-reader-busy"))
    handle = sqs.send(RESULTS, result(old_event, Phase.FINISHED, Outcome.SUCCESS))
    drive(executor, lambda ev: f"rh-{handle}" in sqs.deleted)
    assert executor.get_event_buffer() == {}


def test_revoke_never_raises():
    executor, _, _ = make_executor()
    executor.revoke_task(ti=SimpleNamespace(key=None))
    executor.revoke_task(ti=object())  # no key at all


# -- invoking: payload size, throttling, errors ------------------------------------------------------------------


def test_oversized_event_fails_at_once(started):
    executor, lambda_, _ = started(max_payload_bytes=2000)
    workload = make_workload("big", dag_rel_path="x" * 3000)
    executor.queue_workload(workload, session=None)
    events = drive(executor, lambda ev: workload.ti.key in ev)
    state, info = events[workload.ti.key]
    assert state == TaskInstanceState.FAILED
    assert "max_payload_bytes=2000" in info
    assert lambda_.invokes == []


def wait_invokes(executor, lambda_, count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(lambda_.invokes) < count:
        assert time.monotonic() < deadline, f"expected {count} invokes, got {len(lambda_.invokes)}"
        time.sleep(0.01)
    # Let the pool thread finish, then one heartbeat collects the answer.
    time.sleep(0.05)
    executor.heartbeat()


def test_throttling_backs_off_without_blocking_and_reports_no_capacity(started):
    clock = FakeClock()
    lambda_ = FakeLambda()
    lambda_.answer(
        client_error("TooManyRequestsException", 429), client_error("TooManyRequestsException", 429)
    )
    executor, _, _ = started(lambda_=lambda_, clock=clock, throttle_backoff_max=60)
    workload = make_workload("throttled")
    executor.queue_workload(workload, session=None)
    assert executor.free_capacity() == 15  # parallelism 16, one queued
    executor.heartbeat()
    wait_invokes(executor, lambda_, 1)
    assert executor.free_capacity() == 0
    # Time stands still: heartbeats do not invoke again and do not block.
    started_at = time.monotonic()
    for _ in range(5):
        executor.heartbeat()
    assert time.monotonic() - started_at < 0.5
    assert len(lambda_.invokes) == 1
    clock.advance(25)  # past any back-off of a first or second attempt (cap 20 s + jitter)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 2)
    clock.advance(25)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 3)
    assert executor.get_event_buffer()[workload.ti.key][0] == TaskInstanceState.QUEUED
    assert executor.free_capacity() == 15


def exhaust_backoff(executor, lambda_, clock, workload) -> None:
    """Queue the workload and let three refused invokes, 21 s apart, run past a 30 s back-off bound."""
    executor.queue_workload(workload, session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 1)
    for attempt in (2, 3):
        clock.advance(21)
        executor.heartbeat()
        wait_invokes(executor, lambda_, attempt)


def test_throttled_beyond_the_bound_is_an_infrastructure_failure(started):
    clock = FakeClock()
    lambda_ = FakeLambda()
    lambda_.answer(*[client_error("TooManyRequestsException", 429)] * 10)
    executor, _, _ = started(lambda_=lambda_, clock=clock, throttle_backoff_max=30)
    workload = make_workload("never")
    exhaust_backoff(executor, lambda_, clock, workload)
    state, info = executor.get_event_buffer()[workload.ti.key]
    assert state == TaskInstanceState.FAILED and "throttled" in info
    assert executor.pop_infrastructure_failure(workload.ti.key).reason == "throttled"


def test_server_errors_beyond_the_bound_fail_the_try_without_fallback(started):
    # A 5xx may hide an accepted event that could still start this try: no same-try fallback then.
    clock = FakeClock()
    lambda_ = FakeLambda()
    lambda_.answer(*[client_error("ServiceException", 503)] * 10)
    executor, _, _ = started(lambda_=lambda_, clock=clock, throttle_backoff_max=30)
    workload = make_workload("unavailable")
    exhaust_backoff(executor, lambda_, clock, workload)
    state, info = executor.get_event_buffer()[workload.ti.key]
    assert state == TaskInstanceState.FAILED and "ServiceException" in info
    assert executor.pop_infrastructure_failure(workload.ti.key) is None


def test_a_client_error_is_a_never_started_failure_and_a_server_error_is_retried(started):
    clock = FakeClock()
    lambda_ = FakeLambda()
    lambda_.answer(client_error("ServiceException", 500))
    executor, _, _ = started(lambda_=lambda_, clock=clock)
    retried = make_workload("retried")
    executor.queue_workload(retried, session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 1)
    assert executor.free_capacity() > 0  # a 5xx is not throttling
    clock.advance(25)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 2)
    assert executor.get_event_buffer()[retried.ti.key][0] == TaskInstanceState.QUEUED

    lambda_.answer(client_error("ResourceNotFoundException", 404, "Function not found: airflow-task"))
    rejected = make_workload("rejected")
    executor.queue_workload(rejected, session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 3)
    state, info = executor.get_event_buffer()[rejected.ti.key]
    assert state == TaskInstanceState.FAILED
    assert "ResourceNotFoundException: Function not found" in info
    # A 4xx proves Lambda took no event: nothing ran, so the router may run the same try elsewhere at once.
    failure = executor.pop_infrastructure_failure(rejected.ti.key)
    assert failure.reason == "invoke_rejected"
    assert (
        failure.detail
        == "Lambda refused the invocation: ResourceNotFoundException: Function not found: airflow-task"
    )
    assert executor.free_capacity() > 0  # a refusal of one request is not a pause


def test_an_exception_that_is_no_aws_answer_fails_the_try_without_fallback(started):
    # Raised after the request may have gone out: nothing proves the event was not accepted.
    lambda_ = FakeLambda()
    lambda_.answer(RuntimeError("response parser bug"))
    executor, _, _ = started(lambda_=lambda_)
    workload = make_workload("unexpected")
    executor.queue_workload(workload, session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 1)
    state, info = executor.get_event_buffer()[workload.ti.key]
    assert state == TaskInstanceState.FAILED and "RuntimeError: response parser bug" in info
    assert executor.pop_infrastructure_failure(workload.ti.key) is None


def test_a_client_error_after_an_answer_that_may_hide_an_accepted_event_fails_the_try(started):
    # The first event may be in Lambda's queue: running the same try elsewhere could run it twice.
    clock = FakeClock()
    lambda_ = FakeLambda()
    lambda_.answer(client_error("ServiceException", 500), client_error("ResourceConflictException", 409))
    executor, _, _ = started(lambda_=lambda_, clock=clock)
    workload = make_workload("ambiguous")
    executor.queue_workload(workload, session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 1)
    clock.advance(25)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 2)
    state, info = executor.get_event_buffer()[workload.ti.key]
    assert state == TaskInstanceState.FAILED and "ResourceConflictException" in info
    assert executor.pop_infrastructure_failure(workload.ti.key) is None


EXPIRED_TOKEN = client_error(
    "ExpiredTokenException", 403, "The security token included in the request is expired"
)


def test_credentials_refused_on_invoke_pause_the_executor_until_they_come_back(started_logged):
    # Expired credentials refresh (or a lost credential source comes back): the try must neither fail nor start
    # elsewhere meanwhile, and new tasks overflow elsewhere because the executor has no room.
    clock = FakeClock()
    lambda_, sqs = FakeLambda(), FakeSqs()
    lambda_.answer(EXPIRED_TOKEN, NoCredentialsError())
    executor, log = started_logged(lambda_=lambda_, sqs=sqs, clock=clock, throttle_backoff_max=60)
    workload = make_workload("creds")
    key = workload.ti.key
    executor.queue_workload(workload, session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 1)
    assert states(executor.get_event_buffer()) == {key: TaskInstanceState.QUEUED}  # no FAILED: no retry spent
    assert executor.free_capacity() == 0
    later = make_workload("later")
    executor.queue_workload(later, session=None)
    for _ in range(3):
        executor.heartbeat()
    time.sleep(0.05)
    assert len(lambda_.invokes) == 1  # paused: nothing else is invoked with the same credentials

    clock.advance(21)  # past any back-off of a first attempt (cap 20 s + jitter)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 3)  # both tasks: the first is refused again (NoCredentialsError)
    events = executor.get_event_buffer()
    assert [state for state, _ in events.values()] == [TaskInstanceState.QUEUED]  # the later task only
    assert executor.free_capacity() == 0

    clock.advance(25)  # the credentials are back: Lambda takes the event and the task runs
    executor.heartbeat()
    wait_invokes(executor, lambda_, 4)
    assert executor.get_event_buffer()[key][0] == TaskInstanceState.QUEUED
    assert sent_event(lambda_).task.task_id == "creds"
    sqs.send(RESULTS, result(sent_event(lambda_), Phase.FINISHED, Outcome.SUCCESS, now=clock.now))
    drive(executor, lambda ev: ev.get(key, (None,))[0] == TaskInstanceState.SUCCESS)
    assert executor.pop_infrastructure_failure(key) is None
    assert executor.free_capacity() == 15  # parallelism 16, "later" still held
    refusals = log.text("warning").splitlines()
    assert len(refusals) == 2 and all("refused for its credentials" in line for line in refusals)
    assert "(ExpiredTokenException: AWS credentials or permissions: The security token" in refusals[0]
    assert "(NoCredentialsError: AWS credentials: Unable to locate credentials)" in refusals[1]
    everything = "\n".join(line for _, line in log.lines)
    assert SECRET not in everything and json.loads(sent_event(lambda_).workload)["token"] not in everything


@pytest.mark.parametrize(
    "refusal",
    [
        EXPIRED_TOKEN,
        NoCredentialsError(),
        client_error(
            "UnrecognizedClientException", 403, "The security token included in the request is invalid"
        ),
        client_error("InvalidSignatureException", 403, "Signature expired"),
        client_error("AccessDeniedException", 403, "not authorized to perform: lambda:InvokeFunction"),
    ],
    ids=["expired", "none", "unrecognized", "signature", "access-denied"],
)
def test_credentials_refused_beyond_the_bound_is_a_never_started_infrastructure_failure(started, refusal):
    clock = FakeClock()
    lambda_ = FakeLambda()
    lambda_.answer(*[refusal] * 10)
    executor, _, _ = started(lambda_=lambda_, clock=clock, throttle_backoff_max=30)
    workload = make_workload("never")
    executor.queue_workload(workload, session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 1)
    clock.advance(21)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 2)
    # Within the bound: still waiting, no FAILED (its dispatch id only, recorded when it was queued).
    assert states(executor.get_event_buffer()) == {workload.ti.key: TaskInstanceState.QUEUED}
    clock.advance(21)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 3)
    state, info = executor.get_event_buffer()[workload.ti.key]
    assert state == TaskInstanceState.FAILED
    assert info.startswith(
        "lambda infrastructure failure: credentials: Lambda refused the invocation for 42s"
    )
    failure = executor.pop_infrastructure_failure(workload.ti.key)
    assert failure.reason == "credentials" and failure.executor == "lambda:airflow-task"
    assert workload.ti.key not in executor.running


def test_a_failed_invoke_answer_does_not_restart_a_run_that_started(started):
    # Lambda can accept an event and still answer 5xx (or the answer is lost): the run's STARTED wins.
    clock = FakeClock()
    lambda_ = FakeLambda()
    lambda_.gate = threading.Event()
    lambda_.answer(client_error("ServiceException", 500))
    executor, _, sqs = started(lambda_=lambda_, clock=clock)
    workload = make_workload("accepted-anyway")
    key = workload.ti.key
    executor.queue_workload(workload, session=None)
    executor.heartbeat()
    deadline = time.monotonic() + 5
    while not lambda_.invokes:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sqs.send(RESULTS, result(sent_event(lambda_), Phase.STARTED, now=clock.now))
    drive(executor, lambda ev: ev.get(key, (None,))[0] == TaskInstanceState.RUNNING)
    lambda_.gate.set()  # now the invoke call fails
    time.sleep(0.1)
    for _ in range(3):
        clock.advance(25)  # past any back-off
        executor.heartbeat()
        time.sleep(0.05)
    assert len(lambda_.invokes) == 1
    assert key in executor.running


def test_reserved_concurrency_bounds_runs_in_flight(started):
    executor, lambda_, sqs = started(reserved_concurrency=2)
    loads = [make_workload(f"t{i}") for i in range(3)]
    for workload in loads:
        executor.queue_workload(workload, session=None)
    drive(executor, lambda ev: sum(accepted(ev, w.ti.key) for w in loads) == 2)
    time.sleep(0.1)
    executor.heartbeat()
    assert len(lambda_.invokes) == 2
    assert executor.free_capacity() == 0
    first = sent_event(lambda_, 0)
    sqs.send(RESULTS, result(first, Phase.FINISHED, Outcome.SUCCESS))
    drive(executor, lambda ev: len(lambda_.invokes) == 3)


def two_tasks_one_slot(started, **options):
    """An executor of a function with one slot, handed two tasks: the first invoked, the second waiting for it."""
    executor, lambda_, sqs = started(reserved_concurrency=1, **options)
    first, second = make_workload("first"), make_workload("second")
    executor.queue_workload(first, session=None)
    executor.queue_workload(second, session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 1)
    return executor, lambda_, sqs, first, second


def test_an_event_that_waited_for_a_slot_gets_a_fresh_deadline(started):
    clock = FakeClock()
    executor, lambda_, sqs, _, _ = two_tasks_one_slot(started, clock=clock)
    clock.advance(100)
    sqs.send(RESULTS, result(sent_event(lambda_, 0), Phase.FINISHED, Outcome.SUCCESS, now=clock.now))
    drive(executor, lambda ev: len(lambda_.invokes) == 2)
    waited = sent_event(lambda_, 1)
    assert waited.task.task_id == "second"
    assert waited.issued_at == clock.now and waited.not_after == clock.now + 300


# -- watchdog, adoption, lifecycle -------------------------------------------------------------------------------


def test_event_never_started_expires_after_not_after(started):
    clock = FakeClock()
    executor, lambda_, _ = started(clock=clock)
    workload = make_workload("lost")
    executor.queue_workload(workload, session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 1)
    # A copy delivered just before not_after may run until the function's timeout (60 s): only then, and a grace.
    clock.advance(300 + 60 + 10)
    executor.heartbeat()
    assert executor.get_event_buffer()[workload.ti.key][0] == TaskInstanceState.QUEUED
    clock.advance(10)
    drive(executor, lambda ev: ev.get(workload.ti.key, (None,))[0] == TaskInstanceState.FAILED)
    assert executor.pop_infrastructure_failure(workload.ti.key).reason == "event_expired"


def test_adopts_own_tasks_and_reports_a_result_left_in_the_queue(started):
    executor, _, sqs = started()
    workload = make_workload("adopted")
    key = workload.ti.key
    mine = SimpleNamespace(
        key=key,
        state=TaskInstanceState.RUNNING,
        external_executor_id=lambda_external_id("airflow-task", "r1", "d-old"),
    )
    other_fn = SimpleNamespace(
        key=make_workload("x").ti.key,
        state=TaskInstanceState.RUNNING,
        external_executor_id=lambda_external_id("airflow-task-10g", "r2", "d2"),
    )
    foreign = SimpleNamespace(
        key=make_workload("y").ti.key, state=TaskInstanceState.RUNNING, external_executor_id="abc"
    )
    assert executor.try_adopt_task_instances([mine, other_fn, foreign]) == [other_fn, foreign]
    assert key in executor.running
    old_event = protocol.InvokeEvent(
        dispatch_id="d-old",
        task=TaskRef(*key),
        workload="{}",
        results_queue_url=RESULTS,
        issued_at=time.time(),
        not_after=time.time() + 300,
    )
    sqs.send(RESULTS, result(old_event, Phase.FINISHED, Outcome.SUCCESS))
    events = drive(executor, lambda ev: key in ev)
    assert events[key][0] == TaskInstanceState.SUCCESS


def test_the_dispatch_id_is_reported_before_the_invoke_so_a_scheduler_dying_meanwhile_leaves_it_adoptable(
    started,
):
    lambda_ = FakeLambda()
    lambda_.gate = threading.Event()  # Lambda has the event, its answer has not come back yet
    dying, _, sqs = started(lambda_=lambda_, queues=SharedQueues())  # each scheduler has its own readers
    workload = make_workload("in_the_air")
    key = workload.ti.key
    dying.queue_workload(workload, session=None)
    dying.heartbeat()
    wait_invokes(dying, lambda_, 1)
    state, stored = dying.get_event_buffer()[key]
    event = sent_event(lambda_)
    assert (state, stored) == (
        TaskInstanceState.QUEUED,
        lambda_external_id("airflow-task", "", event.dispatch_id),
    )

    survivor, _, _ = started(sqs=sqs, queues=SharedQueues())
    # Still QUEUED with no request: maybe never sent, so not adopted (Airflow resets it). Once its run claimed
    # the task (RUNNING), the dispatch id alone is enough to adopt it.
    queued = SimpleNamespace(key=key, state=TaskInstanceState.QUEUED, external_executor_id=stored)
    assert survivor.try_adopt_task_instances([queued]) == [queued]
    row = SimpleNamespace(key=key, state=TaskInstanceState.RUNNING, external_executor_id=stored)
    assert survivor.try_adopt_task_instances([row]) == []
    lambda_.gate.set()  # the answer comes, but no heartbeat of the dead scheduler collects it
    dying.terminate()
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.SUCCESS))
    drive(survivor, lambda ev: ev.get(key, (None,))[0] == TaskInstanceState.SUCCESS)


def test_end_and_terminate_leave_no_thread(no_thread_leak):
    for stop in ("end", "terminate"):
        executor, _, _ = make_executor()
        executor.start()
        assert any(t.name.startswith("lambda-results-") for t in threading.enumerate())
        workload = make_workload(f"w-{stop}")
        executor.queue_workload(workload, session=None)
        executor.heartbeat()
        getattr(executor, stop)()


def test_unknown_option_is_refused_at_construction():
    with pytest.raises(LambdaConfigError, match=r"unknown LambdaExecutor option.*'functon_name'"):
        LambdaExecutor(functon_name="typo")


def test_constructing_is_side_effect_free(no_thread_leak):
    # No config needed, no client, no thread: the API server builds executors just to read logs.
    executor = LambdaExecutor()
    ti = SimpleNamespace(external_executor_id=None)
    assert executor.get_task_log(ti, 1) == ([], [])


def test_get_task_log_reads_the_local_service_log(tmp_path):
    folder = tmp_path / "airflow-task"
    folder.mkdir()
    (folder / "2026-01-01-[$LATEST]abc.log").write_text(
        "START RequestId: other Version: $LATEST\nnoise\nEND RequestId: other\nREPORT RequestId: other\n"
        "START RequestId: req-42 Version: $LATEST\nfake task running token eyJa.eyJb.c\n"
        "END RequestId: req-42\nREPORT RequestId: req-42\tDuration: 5 ms\nSTART RequestId: next\n"
    )
    executor, _, _ = make_executor(local_log_dir=str(tmp_path))
    ti = SimpleNamespace(external_executor_id=lambda_external_id("airflow-task", "req-42", "d1"))
    sources, lines = executor.get_task_log(ti, 1)
    assert sources == [
        f"AWS Lambda airflow-task: request req-42 (dispatch d1), local Lambda log folder {tmp_path}/airflow-task"
    ]
    assert lines == [
        "START RequestId: req-42 Version: $LATEST",
        "fake task running token <token>",
        "END RequestId: req-42",
        "REPORT RequestId: req-42\tDuration: 5 ms",
    ]


def test_get_task_log_without_config_still_points_at_the_function():
    ti = SimpleNamespace(external_executor_id=lambda_external_id("airflow-task", "req-1", "d1"))
    sources, lines = LambdaExecutor().get_task_log(ti, 1)
    assert sources == ["AWS Lambda airflow-task: request req-1"]
    assert "function_name" in lines[0] or "required" in lines[0]


def test_loads_as_an_aliased_entry_of_airflows_executor_list(tmp_path):
    # In a subprocess: Airflow's executor loader caches what it parsed at module level.
    script = (
        "from airflow.executors.executor_loader import ExecutorLoader\n"
        "executors = ExecutorLoader.init_executors()\n"
        "print([(type(e).__name__, e.name.alias) for e in executors])\n"
    )
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor,lambda:hybrid_router.lambda_exec.LambdaExecutor",
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "('LambdaExecutor', 'lambda')" in out.stdout.splitlines()[-1]


def test_two_instances_with_different_functions_share_a_queue(started):
    sqs = FakeSqs(redeliver_released=True)
    # Readers race for each message; 50 sightings make a stale verdict for an owned message all but impossible.
    small, small_lambda, _ = started(sqs=sqs, function_name="airflow-task", stale_after_sightings=50)
    big, big_lambda, _ = started(sqs=sqs, function_name="airflow-task-10g", stale_after_sightings=50)
    w_small, w_big = make_workload("small"), make_workload("big")
    small_event, _ = invoke_and_accept(small, small_lambda, w_small)
    big_event, _ = invoke_and_accept(big, big_lambda, w_big)
    assert big_lambda.invokes[0]["FunctionName"] == "airflow-task-10g"
    sqs.send(RESULTS, result(big_event, Phase.FINISHED, Outcome.SUCCESS))
    sqs.send(RESULTS, result(small_event, Phase.FINISHED, Outcome.FAILED))
    events: dict = {}
    deadline = time.monotonic() + 10
    while len(events) < 2 and time.monotonic() < deadline:
        for executor in (small, big):
            executor.heartbeat()
            events.update(
                (key, value)
                for key, value in executor.get_event_buffer().items()
                if value[0] not in ("queued", "running")
            )
        time.sleep(0.02)
    # Each instance reported only its own task, whichever reader saw the message first.
    assert events[w_small.ti.key][0] == TaskInstanceState.FAILED
    assert events[w_big.ti.key][0] == TaskInstanceState.SUCCESS


# -- start-up checks ---------------------------------------------------------------------------------------------


class RecordingLog:
    """Stands in for the executor's logger (Airflow's structlog output does not reach caplog)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str):
        return lambda message, *args, **kwargs: self.lines.append(
            (level, message % args if args else message)
        )

    def text(self, level: str) -> str:
        return "\n".join(line for logged, line in self.lines if logged == level)


@pytest.fixture
def started_logged():
    """Like ``started``, with the executor's log recorded from before ``start()``."""
    created = []

    def factory(**kwargs):
        executor, _, _ = make_executor(**kwargs)
        executor._log = RecordingLog()
        created.append(executor)
        executor.start()
        return executor, executor._log

    yield factory
    for executor in created:
        executor.terminate()


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (
            client_error("ResourceNotFoundException", 404, "Function not found: airflow-task", "GetFunction"),
            "ResourceNotFoundException: Function not found: airflow-task",
        ),
        # No ``.response`` on this one: the provider's executor crashes reading it as a ClientError.
        (NoCredentialsError(), "NoCredentialsError: AWS credentials: Unable to locate credentials"),
    ],
)
def test_an_unreachable_function_stops_start_saying_what_to_check(no_thread_leak, failure, reason):
    lambda_ = FakeLambda()
    lambda_.failing["get_function"] = failure
    executor, _, _ = make_executor(lambda_=lambda_)
    with pytest.raises(LambdaHealthError) as info:
        executor.start()
    assert str(info.value).startswith(f"Lambda function 'airflow-task' is not reachable: {reason}. Check ")
    assert "check_health_on_startup = False" in str(info.value)


def test_a_start_retried_after_missing_credentials_resolves_them_again(no_thread_leak, monkeypatch):
    # A boto client keeps the credentials it found when it was made (none here), and the router retries start().
    without = fake_clients(FakeLambda())
    without.lambda_.failing["get_function"] = NoCredentialsError()
    made = [without, fake_clients(FakeLambda())]
    monkeypatch.setattr(executor_module, "make_clients", lambda config: made.pop(0))
    executor = LambdaExecutor(
        parallelism=16,
        function_name="airflow-task",
        results_queue_url=RESULTS,
        signing_secret=SECRET,
        aws_conn_id="",
        poll_wait_seconds=0,
    )
    with pytest.raises(LambdaHealthError, match="NoCredentialsError"):
        executor.start()
    executor.start()
    try:
        assert made == [] and without.lambda_.closed and without.sqs.closed
    finally:
        executor.terminate()


def test_a_missing_queue_stops_start_naming_the_option(no_thread_leak):
    sqs = FakeSqs()
    sqs.missing_queues.add(DLQ)
    executor, _, _ = make_executor(sqs=sqs)
    with pytest.raises(
        LambdaHealthError,
        match=r"SQS queue 'http://sqs.local/dlq' \(\[lambda_executor\] dead_letter_queue_url\) is not "
        r"reachable: AWS.SimpleQueueService.NonExistentQueue",
    ):
        executor.start()


def test_the_health_check_learns_the_functions_timeout_and_size(started):
    executor, _, _ = started(lambda_=FakeLambda(timeout_s=42, memory_mb=1024))
    assert executor._function_timeout_s == 42
    # what a router compares with its policy's limits
    assert executor.function_limits == FunctionLimits(memory_mb=1024, timeout_s=42)


def test_lambdas_own_retries_are_warned_about(started_logged):
    _, quiet = started_logged(lambda_=FakeLambda(retry_attempts=0))
    assert "MaximumRetryAttempts" not in quiet.text("warning")
    _, retrying = started_logged(lambda_=FakeLambda(retry_attempts=2))
    assert "Function airflow-task has MaximumRetryAttempts = 2" in retrying.text("warning")
    unreadable = FakeLambda()
    unreadable.failing["get_function_event_invoke_config"] = client_error(
        "ResourceNotFoundException", 404, operation="GetFunctionEventInvokeConfig"
    )
    _, unknown = started_logged(lambda_=unreadable)
    assert "Lambda retries a failed async run twice by default" in unknown.text("warning")


def test_reserved_concurrency_is_asked_of_lambda_with_parallelism_as_the_fallback(started_logged):
    executor, _ = started_logged(lambda_=FakeLambda(reserved=3))
    assert executor.free_capacity() == 3
    denied = FakeLambda()
    denied.failing["get_function_concurrency"] = client_error(
        "AccessDeniedException", 403, operation="GetFunctionConcurrency"
    )
    executor, log = started_logged(lambda_=denied)
    assert executor.free_capacity() == 16  # parallelism
    assert "Could not read the reserved concurrency of airflow-task (AccessDeniedException" in log.text(
        "warning"
    )

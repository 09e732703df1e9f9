"""Run binding (issue 9, items 1 and 2): each delivered copy of an event is its own run; a dispatch is bound to the
first run that claimed the task, and nothing but positive knowledge ends a dispatch."""

from __future__ import annotations

import time

from airflow.utils.state import TaskInstanceState

from devtools.workloads import make_workload
from hybrid_router.lambda_exec.external_id import parse_lambda_external_id
from hybrid_router.lambda_exec.protocol import Outcome, Phase

from . import test_executor_unit as unit
from .executor_support import drive
from .fakes import FakeClock, FakeSqs, client_error
from .test_executor_unit import DLQ, RESULTS, invoke_and_accept, result

started = unit.started  # the fixture: an executor on the fakes, terminated after the test

RUN_A = "a" * 32
RUN_B = "b" * 32


def state_of(events, key):
    return events.get(key, (None,))[0]


def settle(executor, sqs, count, clock=None):
    """Heartbeat until ``count`` messages were taken (and deleted), plus two heartbeats."""
    drive(executor, lambda ev: len(executor._inbox) == 0 and len(sqs.deleted) >= count)
    events = {}
    for _ in range(2):
        executor.heartbeat()
        events.update(executor.get_event_buffer())
    return events


def test_a_copy_refused_by_run_is_not_claimed_and_the_claimed_run_decides(started):
    executor, lambda_, sqs = started()
    workload = make_workload("dup")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    # The duplicate's /run got 409 before the healthy run's STARTED arrived.
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.NOT_CLAIMED, run_id=RUN_B, detail="409"))
    events = settle(executor, sqs, 1)
    assert state_of(events, key) is None
    assert executor.pop_infrastructure_failure(key) is None
    sqs.send(RESULTS, result(event, Phase.STARTED, run_id=RUN_A, request_id="req-A"))
    events = drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.RUNNING)
    assert parse_lambda_external_id(events[key][1]).run_id == RUN_A
    # And a refusal after the claim changes nothing either.
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.NOT_CLAIMED, run_id=RUN_B, detail="409"))
    events = settle(executor, sqs, 2)
    assert state_of(events, key) in (None, TaskInstanceState.RUNNING)
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.SUCCESS, run_id=RUN_A, claimed=True))
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.SUCCESS)
    assert executor.pop_infrastructure_failure(key) is None


def test_a_late_copys_event_expired_while_the_bound_run_is_alive_changes_nothing(started):
    executor, lambda_, sqs = started()
    workload = make_workload("long")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    sqs.send(RESULTS, result(event, Phase.STARTED, run_id=RUN_A))
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.RUNNING)
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.EVENT_EXPIRED, run_id=RUN_B, detail="late copy"))
    events = settle(executor, sqs, 1)
    assert state_of(events, key) is None
    assert executor.pop_infrastructure_failure(key) is None
    assert key in executor._dispatches
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.SUCCESS, run_id=RUN_A, claimed=True))
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.SUCCESS)


def test_finals_of_another_run_are_ignored(started):
    executor, lambda_, sqs = started()
    workload = make_workload("other")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    # A short run (FINISHED alone, claimed) binds the dispatch; the other run's results never count.
    sqs.send(RESULTS, result(event, Phase.STARTED, run_id=RUN_A))
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.RUNNING)
    for outcome in (Outcome.FAILED, Outcome.TIMEOUT, Outcome.SUCCESS):
        sqs.send(RESULTS, result(event, Phase.FINISHED, outcome, run_id=RUN_B, claimed=True))
    sqs.send(RESULTS, result(event, Phase.STARTED, run_id=RUN_B))
    events = settle(executor, sqs, 3)  # the SUCCESS is deleted at once, the rest once taken
    assert state_of(events, key) is None
    assert executor._dispatches[key].other_runs == {RUN_B}
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.FAILED, run_id=RUN_A, claimed=True))
    events = drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.FAILED)
    assert executor.pop_infrastructure_failure(key) is None


def test_a_dead_letter_of_another_request_does_not_end_the_bound_run(started):
    executor, lambda_, sqs = started()
    workload = make_workload("dlq")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    sqs.send(RESULTS, result(event, Phase.STARTED, run_id=RUN_A, request_id="req-A"))
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.RUNNING)
    body = lambda_.invokes[-1]["Payload"].decode()
    sqs.send(DLQ, body, attributes={"ErrorCode": "200", "ErrorMessage": "timed out", "RequestID": "req-B"})
    drive(executor, lambda ev: len(executor._inbox) == 0 and len(sqs.deleted) >= 2)
    executor.heartbeat()
    assert state_of(executor.get_event_buffer(), key) is None
    sqs.send(DLQ, body, attributes={"ErrorCode": "200", "ErrorMessage": "timed out", "RequestID": "req-A"})
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.FAILED)
    assert executor.pop_infrastructure_failure(key) is not None


class FlakySqs(FakeSqs):
    broken = False

    def receive_message(self, **kwargs):
        if self.broken:
            raise client_error("ExpiredToken", 400, "expired", "ReceiveMessage")
        return super().receive_message(**kwargs)


def test_failed_receives_past_the_deadlines_do_not_expire_a_dispatch(started):
    clock = FakeClock(time.time())
    sqs = FlakySqs()
    executor, lambda_, _ = started(sqs=sqs, clock=clock)
    workload = make_workload("unread")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    sqs.broken = True
    sqs.send(RESULTS, result(event, Phase.STARTED, run_id=RUN_A, now=clock.now + 1))
    # Far past not_after + 15 s, and past not_after + the function's timeout: nothing was read, nothing decided.
    for _ in range(3):
        clock.advance(300)
        for _ in range(5):
            executor.heartbeat()
            time.sleep(0.02)
        assert state_of(executor.get_event_buffer(), key) is None
    assert executor.pop_infrastructure_failure(key) is None
    sqs.broken = False  # the receive that works first delivers the STARTED: the run is alive
    events = drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.RUNNING)
    assert events[key][0] == TaskInstanceState.RUNNING


def test_an_accepted_dispatch_is_not_expired_while_a_copy_may_still_run(started):
    clock = FakeClock(time.time())
    executor, lambda_, _ = started(clock=clock)  # the fake function's timeout: 60 s
    workload = make_workload("quiet")
    key = workload.ti.key
    invoke_and_accept(executor, lambda_, workload)
    clock.advance(300 + 15 + 1)  # the old rule's moment
    for _ in range(5):
        executor.heartbeat()
        time.sleep(0.02)
    assert state_of(executor.get_event_buffer(), key) is None
    clock.advance(60)
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.FAILED)
    assert executor.pop_infrastructure_failure(key).reason == "event_expired"


def test_the_run_id_reaches_the_external_id_for_a_run_shorter_than_a_heartbeat(started):
    executor, lambda_, sqs = started()
    workload = make_workload("blink")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    sqs.send(
        RESULTS, result(event, Phase.FINISHED, Outcome.SUCCESS, run_id=RUN_A, claimed=True, request_id="r")
    )
    deadline = time.monotonic() + 5
    while len(executor._inbox) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Each heartbeat's buffer is what the scheduler reads (one event per task): RUNNING with the run's id
    # first, the final state in the next.
    executor.heartbeat()
    state, info = executor.get_event_buffer()[key]
    assert state == TaskInstanceState.RUNNING
    assert info == f"lambda:airflow-task:r:{event.dispatch_id}+{RUN_A}"
    assert key in executor.running
    executor.heartbeat()
    assert executor.get_event_buffer()[key][0] == TaskInstanceState.SUCCESS
    assert key not in executor.running


def test_a_copy_that_ended_unreported_without_claiming_says_it_never_held_the_try(started):
    # Another copy (an after-end duplicate, a re-invoke after a lost answer) may claim the try later: the
    # router must not take it from that run, nor fail it.
    executor, lambda_, sqs = started()
    workload = make_workload("slow-cold-start")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    sqs.send(
        RESULTS, result(event, Phase.FINISHED, Outcome.UNREPORTED, run_id=RUN_B, detail="no /run answer")
    )
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.FAILED)
    failure = executor.pop_infrastructure_failure(key)
    assert failure is not None and failure.reason == "unreported" and failure.held is False


def test_a_bound_run_that_timed_out_held_the_try(started):
    executor, lambda_, sqs = started()
    workload = make_workload("too-long")
    key = workload.ti.key
    event, _ = invoke_and_accept(executor, lambda_, workload)
    sqs.send(RESULTS, result(event, Phase.STARTED, run_id=RUN_A, request_id="req-A"))
    sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.TIMEOUT, run_id=RUN_A, claimed=True))
    drive(executor, lambda ev: state_of(ev, key) == TaskInstanceState.FAILED)
    failure = executor.pop_infrastructure_failure(key)
    assert failure is not None and failure.reason == "timeout" and failure.held is True

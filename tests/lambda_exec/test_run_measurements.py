"""What the LambdaExecutor tells its router each finished run used (``child_protocol.ReportsRunMeasurements``):
the figures its handler's FINISHED result carries, or, for a run Lambda killed, the function's memory size."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from airflow.utils.state import TaskInstanceState

from devtools.workloads import make_workload
from hybrid_router.child_protocol import ReportsRunMeasurements, RunMeasurement
from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.executor import LambdaExecutor
from hybrid_router.lambda_exec.external_id import parse_lambda_external_id
from hybrid_router.lambda_exec.measurements import RunMeasurements
from hybrid_router.lambda_exec.protocol import Outcome, Phase, ResultMessage, RunUsage

from .executor_support import SECRET, drive
from .fakes import FakeClock, FakeLambda, FakeSqs, fake_clients

RESULTS = "http://sqs.local/results"
DLQ = "http://sqs.local/dlq"


@pytest.fixture
def executor() -> Iterator[tuple[LambdaExecutor, FakeLambda, FakeSqs]]:
    lambda_, sqs = FakeLambda(memory_mb=512), FakeSqs()
    executor = LambdaExecutor(
        parallelism=4,
        clients=fake_clients(lambda_, sqs),
        function_name="airflow-task",
        results_queue_url=RESULTS,
        dead_letter_queue_url=DLQ,
        signing_secret=SECRET,
        aws_conn_id="",
        poll_wait_seconds=0,
    )
    executor.start()
    yield executor, lambda_, sqs
    executor.terminate()


def accepted_event(executor: LambdaExecutor, lambda_: FakeLambda, task_id: str) -> tuple[Any, str]:
    workload = make_workload(task_id)
    executor.queue_workload(workload, session=None)

    def accepted(events: dict[Any, Any]) -> bool:
        state, info = events.get(workload.ti.key, (None, None))
        return state == TaskInstanceState.QUEUED and bool(parse_lambda_external_id(info).request_id)

    drive(executor, accepted)
    body = next(i["Payload"].decode() for i in lambda_.invokes if task_id in i["Payload"].decode())
    return workload.ti.key, body


def finished(body: str, outcome: Outcome, usage: RunUsage | None) -> str:
    event = protocol.open_event(body, SECRET)
    message = ResultMessage(
        phase=Phase.FINISHED,
        dispatch_id=event.dispatch_id,
        task=event.task,
        sent_at=time.time(),
        started_at=time.time() - 2,
        outcome=outcome,
        return_code=0,
        request_id="req-1",
        usage=usage,
    )
    return protocol.seal_result(message, protocol.result_key(SECRET, event.dispatch_id))


def test_each_run_reports_what_it_used_once(executor):
    executor, lambda_, sqs = executor
    assert isinstance(executor, ReportsRunMeasurements)
    key, body = accepted_event(executor, lambda_, "measured")
    sqs.send(RESULTS, finished(body, Outcome.SUCCESS, RunUsage(1811.2, 1812, 512, 187)))
    drive(executor, lambda events: events.get(key, (None,))[0] == TaskInstanceState.SUCCESS)

    assert executor.pop_run_measurement(key) == RunMeasurement(
        memory_size_mb=512, peak_memory_mb=187, duration_ms=1811.2, billed_duration_ms=1812
    )
    # Popped: what is left is what every run of the function has, its memory size.
    assert executor.pop_run_measurement(key) == RunMeasurement(memory_size_mb=512)


def test_a_run_lambda_killed_for_memory_ran_with_the_functions_memory_size(executor):
    executor, lambda_, sqs = executor
    key, body = accepted_event(executor, lambda_, "hog")
    attributes = {
        "RequestID": "req-1",
        "ErrorCode": "200",
        "ErrorMessage": "Runtime exited with error: signal: killed",
    }
    sqs.send(DLQ, body, attributes=attributes)
    drive(executor, lambda events: events.get(key, (None,))[0] == TaskInstanceState.FAILED)

    assert executor.pop_infrastructure_failure(key).reason == "out_of_memory"
    assert executor.pop_run_measurement(key) == RunMeasurement(memory_size_mb=512)


def test_a_result_from_a_handler_that_does_not_measure_gives_what_is_known(executor):
    executor, lambda_, sqs = executor
    key, body = accepted_event(executor, lambda_, "older")
    sqs.send(RESULTS, finished(body, Outcome.FAILED, usage=None))
    drive(executor, lambda events: events.get(key, (None,))[0] == TaskInstanceState.FAILED)
    assert executor.pop_run_measurement(key) == RunMeasurement(memory_size_mb=512)


def test_measurements_nobody_pops_age_out():
    clock = FakeClock()
    kept = RunMeasurements(clock)
    message = ResultMessage(
        phase=Phase.FINISHED,
        dispatch_id="d",
        task=protocol.TaskRef("dag", "task", "run", 1),
        sent_at=0,
        outcome=Outcome.SUCCESS,
        usage=RunUsage(10.0, 10, None, 50),
    )
    kept.record("key-a", message)
    kept.record("key-b", message)
    assert kept.pop("key-a") == RunMeasurement(None, 50, 10.0, 10)
    clock.advance(3601)
    assert kept.pop("key-b") is None  # and, with no memory size known, nothing at all

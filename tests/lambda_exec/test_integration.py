"""The LambdaExecutor driven directly against moto's SQS server and the local Lambda service.

The function runs the project's real handler with a small script in place of Airflow's task runner
(``fixture_handlers.real_handler_with_fake_workload`` in tests/lambda_local/), so timeouts, memory kills and the
DLQ are the local service's real ones.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.utils.state import TaskInstanceState

from devtools.devstack import FAKE_AWS_ENV
from devtools.workloads import make_workload
from hybrid_router.lambda_exec.executor import LambdaExecutor
from hybrid_router.lambda_exec.external_id import parse_lambda_external_id
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService

from .executor_support import SECRET, drive

# The local service's fixture handlers: the functions' code_path.
FIXTURE_HANDLERS = Path(__file__).resolve().parents[1] / "lambda_local"
FUNCTION_TIMEOUT_S = 5
FINAL = (TaskInstanceState.SUCCESS, TaskInstanceState.FAILED)


@pytest.fixture
def aws_env(monkeypatch, moto_server):
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def lambda_stack(aws_env, moto_server, tmp_path) -> Iterator[SimpleNamespace]:
    suffix = uuid.uuid4().hex[:8]
    results = moto_server.create_queue(f"results-{suffix}")
    dlq = moto_server.create_queue(f"dlq-{suffix}")
    function = FunctionConfig(
        name="airflow-task",
        handler="fixture_handlers.real_handler_with_fake_workload",
        code_path=str(FIXTURE_HANDLERS),
        memory_mb=256,
        timeout_s=FUNCTION_TIMEOUT_S,
        dead_letter_queue_url=dlq,
        maximum_retry_attempts=0,
        maximum_event_age_s=300,
        environment={"HYBRID_ROUTER_DEADLINE_MARGIN_S": "1"},  # no signing secret: the function needs none
    )
    env = {**os.environ, **FAKE_AWS_ENV, "AWS_ENDPOINT_URL_SQS": moto_server.url}
    with LocalLambdaService(
        functions=[function], env=env, sqs_endpoint_url=moto_server.url, log_dir=tmp_path / "logs"
    ) as svc:
        yield SimpleNamespace(
            service=svc, results=results, dlq=dlq, moto=moto_server, log_dir=tmp_path / "logs"
        )


def make_executor(stack: SimpleNamespace, **overrides) -> LambdaExecutor:
    options = {
        "function_name": "airflow-task",
        "results_queue_url": stack.results,
        "dead_letter_queue_url": stack.dlq,
        "signing_secret": SECRET,
        "lambda_endpoint_url": stack.service.url,
        "sqs_endpoint_url": stack.moto.url,
        "region_name": "us-east-1",
        "aws_conn_id": "",
        "poll_wait_seconds": 1,
        "local_log_dir": str(stack.log_dir),
        **overrides,
    }
    return LambdaExecutor(parallelism=32, **options)


def count_calls(executor: LambdaExecutor) -> list[str]:
    calls: list[str] = []
    for client in executor._clients.all:
        client.meta.events.register("before-call.*.*", lambda model, **_: calls.append(model.name))
    return calls


def test_outcomes_through_the_local_service(lambda_stack, no_thread_leak):
    executor = make_executor(lambda_stack)
    executor.start()
    calls = count_calls(executor)
    try:
        loads = {w.ti.key: w for w in [make_workload(f"ok-{i}") for i in range(6)]}
        loads.update(
            {w.ti.key: w for w in [make_workload("fail-1"), make_workload("sleep-1"), make_workload("hog-1")]}
        )
        for workload in loads.values():
            executor.queue_workload(workload, session=None)
        seen_running: dict = {}
        finished_at: dict = {}

        def done(events):
            for key, (state, info) in events.items():
                if state == TaskInstanceState.RUNNING:
                    seen_running[key] = info
                if state in FINAL and key not in finished_at:
                    finished_at[key] = time.monotonic()
            return len(finished_at) == len(loads)

        started = time.monotonic()
        events = drive(executor, done, timeout=60, interval=0.1)
    finally:
        executor.end()
    states = {key.task_id: state for key, (state, _) in events.items()}
    assert all(states[f"ok-{i}"] == TaskInstanceState.SUCCESS for i in range(6))
    assert states["fail-1"] == TaskInstanceState.FAILED
    keys = {key.task_id: key for key in loads}
    assert executor.pop_infrastructure_failure(keys["fail-1"]) is None

    timeout = executor.pop_infrastructure_failure(keys["sleep-1"])
    assert timeout is not None and timeout.reason == "timeout", timeout
    # Reported within 3 s of the function's timeout (the handler stops the task 1 s before it).
    assert finished_at[keys["sleep-1"]] - started < FUNCTION_TIMEOUT_S + 3

    oom = executor.pop_infrastructure_failure(keys["hog-1"])
    assert oom is not None and oom.reason == "out_of_memory", oom
    assert "signal: killed" in oom.detail

    # A run longer than the handler's STARTED grace reported STARTED while it ran: RUNNING with the run's
    # request id in the external id, in a heartbeat of its own before the final state.
    running_info = seen_running[keys["sleep-1"]]
    parsed = parse_lambda_external_id(running_info)
    assert parsed.function_name == "airflow-task" and parsed.request_id
    assert len(parsed.run_id) == 32  # the run (delivered copy of the event) that claimed the task
    sources, lines = executor.get_task_log(SimpleNamespace(external_executor_id=running_info), 1)
    assert any("fake task sleep-1 running" in line for line in lines), (sources, lines)

    invokes = calls.count("Invoke")
    assert invokes == len(loads)
    # Batch receive and delete: far fewer SQS calls than messages (2 results per task).
    assert calls.count("DeleteMessage") == 0
    assert calls.count("DeleteMessageBatch") <= len(loads)


def test_forged_result_and_duplicate_delivery_change_nothing(lambda_stack, no_thread_leak):
    from hybrid_router.lambda_exec import protocol
    from hybrid_router.lambda_exec.protocol import Outcome, Phase, ResultMessage, TaskRef

    executor = make_executor(lambda_stack)
    executor.start()
    sqs = lambda_stack.moto.client("sqs")
    try:
        lambda_stack.service.set_delivery_faults(duplicate_next=1)
        workload = make_workload("ok-dup")
        key = workload.ti.key
        executor.queue_workload(workload, session=None)
        queued = drive(executor, lambda ev: key in ev)
        dispatch_id = parse_lambda_external_id(queued[key][1])[2]
        # A forged FAILED for the same dispatch, signed with the wrong secret: must change nothing.
        forged = ResultMessage(
            phase=Phase.FINISHED,
            dispatch_id=dispatch_id,
            task=TaskRef(*key),
            sent_at=time.time(),
            outcome=Outcome.FAILED,
            return_code=1,
        )
        sqs.send_message(QueueUrl=lambda_stack.results, MessageBody=protocol.seal_result(forged, b"wrong"))
        events = drive(executor, lambda ev: ev.get(key, (None,))[0] in FINAL, timeout=30)
        assert events[key][0] == TaskInstanceState.SUCCESS
        # The duplicate run's messages arrive later and are dropped: no second final event.
        deadline = time.monotonic() + 4
        later = {}
        while time.monotonic() < deadline:
            executor.heartbeat()
            later.update(executor.get_event_buffer())
            time.sleep(0.1)
        assert later.get(key, (None,))[0] not in FINAL
        stats = lambda_stack.service.stats()["functions"]["airflow-task"]
        assert stats["duplicates_delivered"] == 1 and stats["invocations"] == 2
    finally:
        executor.end()


def test_a_new_executor_adopts_and_reports_a_task_finished_meanwhile(lambda_stack, no_thread_leak):
    # A failure: its result waits in the queue for whoever adopts the task. (A SUCCESS is deleted once read:
    # the task process recorded it in Airflow's database before exiting, so a restarted scheduler does not
    # adopt the task at all.)
    first = make_executor(lambda_stack)
    first.start()
    workload = make_workload("fail-adopt")
    key = workload.ti.key
    first.queue_workload(workload, session=None)
    # The id recorded before the invoke names no request yet; the scheduler's row gets the one that does.
    queued = drive(first, lambda ev: key in ev and parse_lambda_external_id(ev[key][1]).request_id)
    external_executor_id = queued[key][1]
    first.terminate()  # the scheduler dies: nobody reads the queue while the task finishes
    time.sleep(2)

    second = make_executor(lambda_stack)
    second.start()
    try:
        ti = SimpleNamespace(
            key=key, state=TaskInstanceState.QUEUED, external_executor_id=external_executor_id
        )
        assert second.try_adopt_task_instances([ti]) == []
        events = drive(second, lambda ev: ev.get(key, (None,))[0] in FINAL, timeout=30)
        assert events[key][0] == TaskInstanceState.FAILED
        assert second.pop_infrastructure_failure(key) is None  # the task's own failure: no fallback
    finally:
        second.end()


def test_two_schedulers_sharing_one_results_queue_get_all_their_results_promptly(
    lambda_stack, no_thread_leak
):
    # Two schedulers' executors (a registry of shared readers each, as two processes have) on one results queue:
    # each receives the other's results now and then and must release them at once (visibility 0), never hide
    # them for a visibility timeout, never delete them. Counted: releases and their visibility, receives.
    from hybrid_router.lambda_exec.results import FREE_RELEASES
    from hybrid_router.lambda_exec.shared_readers import SharedQueues

    pair = [make_executor(lambda_stack, queues=SharedQueues()) for _ in range(2)]
    visibility: list[int] = []
    counts: list[int] = []
    for executor in pair:
        executor.start()
        for client in executor._clients.all:
            client.meta.events.register(
                "provide-client-params.sqs.ChangeMessageVisibilityBatch",
                lambda params, **_: visibility.extend(e["VisibilityTimeout"] for e in params["Entries"]),
            )
            client.meta.events.register(
                "after-call.sqs.ReceiveMessage",
                lambda parsed, **_: counts.extend(
                    int(m["Attributes"]["ApproximateReceiveCount"]) for m in parsed.get("Messages", [])
                ),
            )
    try:
        loads = [[make_workload(f"ok-{side}{i}") for i in range(6)] for side in "ab"]
        for executor, workloads in zip(pair, loads, strict=True):
            for workload in workloads:
                executor.queue_workload(workload, session=None)
        finals: list[dict] = [{}, {}]
        deadline = time.monotonic() + 60
        while sum(map(len, finals)) < 12:
            assert time.monotonic() < deadline, f"final states so far: {finals}"
            for executor, seen in zip(pair, finals, strict=True):
                executor.heartbeat()
                seen.update((k, s) for k, (s, _) in executor.get_event_buffer().items() if s in FINAL)
            time.sleep(0.05)
    finally:
        for executor in pair:
            executor.end()
    for seen, workloads in zip(finals, loads, strict=True):
        assert seen == {w.ti.key: TaskInstanceState.SUCCESS for w in workloads}
    # Every message reached its owner after a few receives, and no release hid a message for a visibility timeout.
    assert visibility, "each reader saw some of the other's results"
    assert max(counts) <= FREE_RELEASES, counts
    assert set(visibility) == {0}, visibility

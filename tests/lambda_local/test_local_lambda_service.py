"""The local Lambda service through real processes: the service itself, its sandboxes, moto's SQS and boto3."""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import psutil
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError
from moto_sqs import Moto

from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.local.faults import FaultConfigError, Faults, FaultSettings, Latency
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService
from hybrid_router.lambda_exec.protocol import InvokeEvent, Outcome, Phase, TaskRef

CODE_PATH = str(Path(__file__).parent)
# What the service and its sandboxes are given: fake AWS settings, as a Lambda sandbox has them. SECRET is the
# executor's: it seals the events and checks the results; the functions never hold it.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
SECRET = "test-signing-secret"

StartService = Callable[..., LocalLambdaService]


@pytest.fixture
def start_service(moto_server: Moto, tmp_path: Path) -> Iterator[StartService]:
    started: list[LocalLambdaService] = []

    def start(*functions: FunctionConfig, **options: Any) -> LocalLambdaService:
        options.setdefault("retry_delays_s", (0.2, 0.4))
        service = LocalLambdaService(
            functions=list(functions),
            env={**os.environ, **FAKE_AWS_ENV},
            sqs_endpoint_url=moto_server.url,
            log_dir=tmp_path / "lambda-logs",
            **options,
        )
        started.append(service)
        return service.start()

    try:
        yield start
    finally:
        for service in started:
            service.stop()


def fixture_fn(name: str, handler: str, **options: Any) -> FunctionConfig:
    options.setdefault("memory_mb", 256)
    return FunctionConfig(name, handler=f"fixture_handlers.{handler}", code_path=CODE_PATH, **options)


def lambda_client(service: LocalLambdaService, retries: bool = False) -> Any:
    # No botocore retries by default: the tests look at the first answer (a 429 would be retried).
    config = Config(retries={"total_max_attempts": 3 if retries else 1, "mode": "standard"})
    return boto3.client(
        "lambda",
        endpoint_url=service.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=config,
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def report_of(stream: str, request_id: str) -> dict[str, float]:
    """The figures of the REPORT line of ``request_id`` in a log stream: ``{"Duration": 12.3, ...}``."""
    (line,) = [line for line in stream.splitlines() if line.startswith(f"REPORT RequestId: {request_id}\t")]
    fields = dict(field.split(": ", 1) for field in line.split("\t")[1:])
    return {name: float(value.split()[0]) for name, value in fields.items() if value.endswith(("ms", "MB"))}


def request_id_of(answer: dict[str, Any]) -> str:
    return answer["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]


def error_of(excinfo: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, dict[str, Any]]:
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"], response


# -- the round trip -----------------------------------------------------------------------------------------


def test_async_invoke_runs_the_handler_and_the_result_reaches_sqs_signed(
    start_service: StartService, moto_server: Moto
) -> None:
    results_url, _ = moto_server.new_queue("results")
    fn = fixture_fn(
        "airflow-task",
        "real_handler_with_fake_workload",
        # STARTED before the run, whatever its length: both results travel through the service.
        environment={"HYBRID_ROUTER_STARTED_GRACE_S": "0"},
    )
    service = start_service(fn)
    now = time.time()
    event = InvokeEvent(
        dispatch_id=uuid.uuid4().hex,
        task=TaskRef("dag", "task", "run", 1),
        workload=json.dumps({"exit": 0}),
        results_queue_url=results_url,
        issued_at=now,
        not_after=now + 300,
    )

    answer = lambda_client(service).invoke(
        FunctionName="airflow-task",
        InvocationType="Event",
        Payload=protocol.seal_event(event, SECRET.encode()),
    )

    assert answer["StatusCode"] == 202
    request_id = request_id_of(answer)
    messages = moto_server.receive_all(results_url, 2, timeout=20)
    results = sorted(
        (protocol.open_result(m["Body"], SECRET.encode()) for m in messages),
        key=lambda r: r.phase != Phase.STARTED,
    )
    assert [r.phase for r in results] == [Phase.STARTED, Phase.FINISHED]
    finished = results[1]
    assert finished.outcome is Outcome.SUCCESS
    assert finished.dispatch_id == event.dispatch_id
    assert finished.request_id == request_id
    assert finished.function_name == "airflow-task"
    # The log stream named in the result exists and holds Lambda's lines and the task's output. The service
    # writes END and REPORT once the handler has returned, which is just after it sent its result.
    path = service.log_stream_path("airflow-task", finished.log_stream)
    reported = f"REPORT RequestId: {request_id}\t"
    stream = wait_for(lambda: reported in path.read_text() and path.read_text(), what="the REPORT line")
    assert f"START RequestId: {request_id} Version: $LATEST" in stream
    assert "fake task ran" in stream
    assert f"END RequestId: {request_id}" in stream
    # The result carries the figures of Lambda's REPORT line, measured the way the service measures its own:
    # the memory size, the sandbox's peak (the same process tree), and a duration within the service's.
    report = report_of(stream, request_id)
    usage = finished.usage
    assert usage is not None and usage.memory_size_mb == report["Memory Size"] == 256
    assert usage.duration_ms <= report["Duration"] and usage.billed_duration_ms <= report["Billed Duration"]
    assert abs(usage.peak_memory_mb - report["Max Memory Used"]) <= 0.1 * report["Max Memory Used"]


def test_a_task_cannot_sign_a_result_the_executor_accepts_for_another_dispatch(
    start_service: StartService, moto_server: Moto, tmp_path: Path
) -> None:
    # Dispatch ids are no secret (they are in external_executor_id), and a task runs in the handler's sandbox.
    results_url, _ = moto_server.new_queue("results")
    # FINISHED alone, however long the task takes.
    fn = fixture_fn(
        "airflow-task", "real_handler_with_fake_workload", environment={"HYBRID_ROUTER_STARTED_GRACE_S": "60"}
    )
    service = start_service(fn)
    own_id, other_id = uuid.uuid4().hex, uuid.uuid4().hex
    out = tmp_path / "forged.json"
    forge = {
        "dispatch_id": other_id,
        "task": {"dag_id": "dag", "task_id": "victim", "run_id": "run", "try_number": 1},
        "own_dispatch_id": own_id,
        "own_key": protocol.result_key(SECRET, own_id).hex(),  # the worst case: read from the sandbox
        "out": str(out),
    }
    now = time.time()
    event = InvokeEvent(
        own_id, TaskRef("dag", "hostile", "run", 1), json.dumps({"forge": forge}), results_url, now, now + 300
    )

    lambda_client(service).invoke(
        FunctionName="airflow-task", InvocationType="Event", Payload=protocol.seal_event(event, SECRET)
    )

    (message,) = moto_server.receive_all(results_url, 1, timeout=20)
    # The executor's check: the run's own result is accepted, every forgery for the other dispatch is refused.
    assert protocol.open_result(message["Body"], SECRET).outcome is Outcome.SUCCESS
    made = json.loads(out.read_text())
    assert protocol.open_result(made["own"], SECRET).dispatch_id == own_id  # the task could sign, for itself
    assert len(made["forged"]) > 2
    for body in made["forged"]:
        with pytest.raises(protocol.MessageError, match="bad signature"):
            protocol.open_result(body, SECRET)
    assert not any(SECRET in value for value in made["environ"].values())


def test_sync_invoke_context_environment_and_warm_reuse(start_service: StartService) -> None:
    fn = fixture_fn("describe", "describe", environment={"FIXTURE_MARKER": "from-function-env"}, timeout_s=30)
    service = start_service(fn)
    client = lambda_client(service)

    first = client.invoke(FunctionName="describe", Payload=b'{"hello": "world"}', LogType="Tail")
    second = client.invoke(FunctionName="describe", Payload=b"{}")

    assert first["StatusCode"] == 200 and "FunctionError" not in first
    one, two = json.loads(first["Payload"].read()), json.loads(second["Payload"].read())
    assert one["event"] == {"hello": "world"}
    assert one["request_id"] == request_id_of(first)
    assert one["function_name"] == "describe"
    assert one["memory_limit_in_mb"] == "256"
    assert 25_000 < one["remaining_ms"] <= 30_000
    assert one["env_marker"] == "from-function-env"
    assert one["pgid"] == one["pid"], "a sandbox runs in its own process group"
    assert two["pid"] == one["pid"], "the second invocation reuses the warm sandbox"
    assert "Init Duration" in __import__("base64").b64decode(first["LogResult"]).decode()
    stats = service.stats()["functions"]["describe"]
    assert stats["cold_starts"] == 1 and stats["warm_starts"] == 1


def test_function_errors_are_200_with_function_error_header(start_service: StartService) -> None:
    service = start_service(fixture_fn("fails", "fail"), fixture_fn("exits", "exit_runtime"))
    client = lambda_client(service)

    failed = client.invoke(FunctionName="fails", Payload=b"{}")
    body = json.loads(failed["Payload"].read())
    assert failed["StatusCode"] == 200 and failed["FunctionError"] == "Unhandled"
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"] == "the handler failed on purpose"
    assert any("fixture_handlers.py" in frame for frame in body["stackTrace"])

    exited = client.invoke(FunctionName="exits", Payload=b"{}")
    body = json.loads(exited["Payload"].read())
    assert exited["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Runtime.ExitError"
    assert body["errorMessage"] == "Runtime exited with error: exit status 3"


# -- API errors as boto3 sees them -----------------------------------------------------------------------------


def test_error_codes_and_statuses(start_service: StartService) -> None:
    service = start_service(fixture_fn("noop", "noop"), fixture_fn("closed", "noop", reserved_concurrency=0))
    client = lambda_client(service)

    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="missing", Payload=b"{}")
    assert error_of(excinfo)[:2] == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as excinfo:
        client.get_function(FunctionName="missing")
    assert error_of(excinfo)[:2] == ("ResourceNotFoundException", 404)

    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="noop", Payload=b"{not json")
    assert error_of(excinfo)[:2] == ("InvalidRequestContentException", 400)

    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="noop", InvocationType="Event", Payload=json.dumps("x" * (1024 * 1024)))
    assert error_of(excinfo)[:2] == ("RequestTooLargeException", 413)
    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="noop", Payload=json.dumps("x" * (6 * 1024 * 1024)))
    assert error_of(excinfo)[:2] == ("RequestTooLargeException", 413)
    # Between the two limits: too large for an async event, fine for a synchronous call.
    assert (
        client.invoke(FunctionName="noop", Payload=json.dumps("x" * (2 * 1024 * 1024)))["StatusCode"] == 200
    )

    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="closed", Payload=b"{}")
    code, status, response = error_of(excinfo)
    assert (code, status) == ("TooManyRequestsException", 429)
    assert response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"

    assert client.invoke(FunctionName="noop", InvocationType="DryRun")["StatusCode"] == 204
    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="noop", Qualifier="7", Payload=b"{}")
    assert error_of(excinfo)[:2] == ("ResourceNotFoundException", 404)


def test_sync_invoke_over_reserved_concurrency_is_throttled(
    start_service: StartService, tmp_path: Path
) -> None:
    service = start_service(fixture_fn("single", "record", reserved_concurrency=1))
    client = lambda_client(service)
    record = tmp_path / "runs.jsonl"
    busy = threading.Thread(
        target=client.invoke,
        kwargs={"FunctionName": "single", "Payload": json.dumps({"record_file": str(record), "sleep": 1.5})},
    )
    busy.start()
    try:
        wait_for(lambda: service.stats()["functions"]["single"]["in_flight"] == 1, what="the first run")
        with pytest.raises(ClientError) as excinfo:
            client.invoke(FunctionName="single", Payload=json.dumps({"record_file": str(record)}))
        code, status, response = error_of(excinfo)
        assert (code, status, response["Reason"]) == (
            "TooManyRequestsException",
            429,
            "ReservedFunctionConcurrentInvocationLimitExceeded",
        )
        assert response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
    finally:
        busy.join()
    assert service.stats()["functions"]["single"]["throttles"] == 1


def test_request_rate_limit_throttles_async_invokes_too(start_service: StartService) -> None:
    service = start_service(fixture_fn("limited", "noop", max_requests_per_s=3))
    client = lambda_client(service)

    codes = []
    for _ in range(6):
        try:
            codes.append(
                client.invoke(FunctionName="limited", InvocationType="Event", Payload=b"{}")["StatusCode"]
            )
        except ClientError as exc:
            assert exc.response["Reason"] == "FunctionInvocationRateLimitExceeded"
            codes.append(exc.response["ResponseMetadata"]["HTTPStatusCode"])

    assert codes[:3] == [202, 202, 202]
    assert 429 in codes[3:]


# -- concurrency, queueing, retries, age, duplicates --------------------------------------------------------


def test_reserved_concurrency_queues_async_events(start_service: StartService, tmp_path: Path) -> None:
    service = start_service(fixture_fn("serial", "record", reserved_concurrency=1))
    client = lambda_client(service)
    record = tmp_path / "runs.jsonl"
    payload = json.dumps({"record_file": str(record), "sleep": 0.3})

    begin = time.monotonic()
    answers = [
        client.invoke(FunctionName="serial", InvocationType="Event", Payload=payload) for _ in range(4)
    ]
    accept_time = time.monotonic() - begin

    assert [a["StatusCode"] for a in answers] == [202] * 4
    assert accept_time < 1.0, "async invokes over concurrency are queued, not throttled or blocked"
    assert service.stats()["functions"]["serial"]["queued"] >= 2
    runs = wait_for(lambda: len(read_lines(record)) == 4 and read_lines(record), what="4 runs")
    runs.sort(key=lambda r: r["start"])
    for earlier, later in itertools.pairwise(runs):
        assert later["start"] >= earlier["end"] - 0.01, "never two runs at once with reserved concurrency 1"
    counts = service.stats()["functions"]["serial"]
    assert counts["throttles"] == 0
    # Each event that found the one slot taken waited for it, counted once (at least those queued above).
    assert 2 <= counts["concurrency_waits"] <= 3 and counts["max_in_flight"] == 1


def test_a_throttled_event_is_tried_again_after_a_doubling_wait_not_as_soon_as_a_slot_frees(
    start_service: StartService, tmp_path: Path
) -> None:
    """AWS returns an async event that found its function at its concurrency limit to the queue and tries it
    again after 1 s, then 2 s, ... up to 5 min: a slot that frees meanwhile stays free."""
    service = start_service(fixture_fn("one-slot", "record", reserved_concurrency=1))
    client = lambda_client(service)
    record = tmp_path / "runs.jsonl"
    payload = json.dumps({"record_file": str(record), "sleep": 0.2})
    client.invoke(FunctionName="one-slot", InvocationType="Event", Payload=payload)
    wait_for(lambda: service.stats()["functions"]["one-slot"]["in_flight"] == 1, what="the first run")
    for _ in range(2):
        client.invoke(FunctionName="one-slot", InvocationType="Event", Payload=payload)

    runs = wait_for(lambda: len(read_lines(record)) == 3 and read_lines(record), what="3 runs", timeout=20)
    first, second, third = sorted(runs, key=lambda r: r["start"])
    # Both found the slot taken: tried again 1 s later, when one took it and the other was throttled again
    # (its next try 2 s later), though each run lasts 0.2 s.
    assert second["start"] - first["end"] > 0.5
    assert third["start"] - second["end"] > 1.5
    counts = service.stats()["functions"]["one-slot"]
    assert counts["throttled_retries"] >= 3 and counts["concurrency_waits"] == 2
    assert counts["throttles"] == 0  # the invokes themselves were accepted (202)


def test_a_service_told_not_to_throttle_starts_a_waiting_event_when_a_slot_frees(
    start_service: StartService, tmp_path: Path
) -> None:
    service = start_service(fixture_fn("waits", "record", reserved_concurrency=1), throttle_retry_s=(0, 0))
    client = lambda_client(service)
    record = tmp_path / "runs.jsonl"
    payload = json.dumps({"record_file": str(record), "sleep": 0.2})
    for _ in range(2):
        client.invoke(FunctionName="waits", InvocationType="Event", Payload=payload)
    runs = wait_for(lambda: len(read_lines(record)) == 2 and read_lines(record), what="2 runs")
    first, second = sorted(runs, key=lambda r: r["start"])
    assert second["start"] - first["end"] < 0.5
    assert service.stats()["functions"]["waits"]["throttled_retries"] == 0


def test_raising_reserved_concurrency_starts_queued_events(
    start_service: StartService, tmp_path: Path
) -> None:
    service = start_service(fixture_fn("grows", "record", reserved_concurrency=1))
    client = lambda_client(service)
    record = tmp_path / "runs.jsonl"
    # Longer than the throttled events' first wait (1 s): they start at their next try, not after this run.
    payload = json.dumps({"record_file": str(record), "sleep": 3.0})
    for _ in range(3):
        client.invoke(FunctionName="grows", InvocationType="Event", Payload=payload)
    wait_for(lambda: service.stats()["functions"]["grows"]["in_flight"] == 1, what="the first run")

    client.put_function_concurrency(FunctionName="grows", ReservedConcurrentExecutions=3)

    runs = wait_for(lambda: len(read_lines(record)) == 3 and read_lines(record), what="3 runs")
    runs.sort(key=lambda r: r["start"])
    assert runs[2]["start"] < runs[0]["end"], "the queued events started once the limit was raised"
    stats = wait_for(
        lambda: (s := service.stats()["functions"]["grows"])["in_flight"] == 0 and s, what="idle"
    )
    assert stats["queued"] == 0


def test_async_retries_then_dlq_with_aws_attributes(
    start_service: StartService, moto_server: Moto, tmp_path: Path
) -> None:
    dlq_url, _ = moto_server.new_queue("dlq")
    fn = fixture_fn("flaky", "record", maximum_retry_attempts=2, dead_letter_queue_url=dlq_url)
    service = start_service(fn)
    record = tmp_path / "runs.jsonl"
    payload = json.dumps({"record_file": str(record), "fail": "boom from the handler"})

    answer = lambda_client(service).invoke(FunctionName="flaky", InvocationType="Event", Payload=payload)

    request_id = request_id_of(answer)
    (message,) = moto_server.receive_all(dlq_url, 1, timeout=15)
    assert message["Body"] == payload, "the DLQ message body is exactly the payload the invoker sent"
    attributes = message["MessageAttributes"]
    assert attributes["RequestID"] == {"StringValue": request_id, "DataType": "String"}
    assert attributes["ErrorCode"] == {"StringValue": "200", "DataType": "Number"}
    assert attributes["ErrorMessage"]["StringValue"] == "boom from the handler"
    runs = read_lines(record)
    assert len(runs) == 3 and {r["request_id"] for r in runs} == {request_id}
    # Delays 0.2 s then 0.4 s between the runs.
    assert runs[1]["start"] - runs[0]["end"] >= 0.15
    assert runs[2]["start"] - runs[1]["end"] >= 0.35
    # The service counts a dead letter once SQS has answered, a moment after the message is visible.
    stats = wait_for(
        lambda: (s := service.stats()["functions"]["flaky"])["dlq_sends"] == 1 and s, what="count"
    )
    assert stats["retries"] == 2


def test_events_older_than_the_maximum_age_go_to_the_dlq(
    start_service: StartService, moto_server: Moto
) -> None:
    dlq_url, _ = moto_server.new_queue("dlq")
    fn = fixture_fn(
        "starved", "noop", reserved_concurrency=0, maximum_event_age_s=1, dead_letter_queue_url=dlq_url
    )
    service = start_service(fn)

    begin = time.monotonic()
    lambda_client(service).invoke(FunctionName="starved", InvocationType="Event", Payload=b'{"n": 1}')
    (message,) = moto_server.receive_all(dlq_url, 1, timeout=10)

    assert 1.0 <= time.monotonic() - begin < 5.0
    assert message["Body"] == '{"n": 1}'
    assert message["MessageAttributes"]["ErrorCode"]["StringValue"] == "429"
    assert "MaximumEventAgeInSeconds" in message["MessageAttributes"]["ErrorMessage"]["StringValue"]
    assert service.stats()["functions"]["starved"]["expired"] == 1


def test_duplicate_delivery_hook_runs_the_next_event_twice(
    start_service: StartService, tmp_path: Path
) -> None:
    service = start_service(fixture_fn("dup", "record"))
    client = lambda_client(service)
    record = tmp_path / "runs.jsonl"
    payload = json.dumps({"record_file": str(record)})

    assert service.set_delivery_faults(duplicate_next=1)["duplicate_next"] == 1
    first = client.invoke(FunctionName="dup", InvocationType="Event", Payload=payload)
    second = client.invoke(FunctionName="dup", InvocationType="Event", Payload=payload)

    runs = wait_for(lambda: len(read_lines(record)) >= 3 and read_lines(record), what="3 runs")
    time.sleep(0.3)  # a fourth run would show up by now
    ids = [r["request_id"] for r in read_lines(record)]
    first_id = request_id_of(first)
    second_id = request_id_of(second)
    assert sorted(ids) == sorted([first_id, first_id, second_id]), runs
    assert service.stats()["functions"]["dup"]["duplicates_delivered"] == 1


# -- limits: timeout and memory ------------------------------------------------------------------------------


def test_timeout_kills_the_sandbox_tree_and_dead_letters_the_event(
    start_service: StartService, moto_server: Moto, tmp_path: Path
) -> None:
    dlq_url, _ = moto_server.new_queue("dlq")
    fn = fixture_fn("slow", "sleep_with_child", timeout_s=2, dead_letter_queue_url=dlq_url)
    service = start_service(fn)
    pid_file = tmp_path / "pids.json"
    payload = json.dumps({"pid_file": str(pid_file), "seconds": 60})

    answer = lambda_client(service).invoke(FunctionName="slow", InvocationType="Event", Payload=payload)
    (message,) = moto_server.receive_all(dlq_url, 1, timeout=15)

    request_id = request_id_of(answer)
    assert message["Body"] == payload
    assert message["MessageAttributes"]["RequestID"]["StringValue"] == request_id
    assert message["MessageAttributes"]["ErrorCode"]["StringValue"] == "200"
    assert message["MessageAttributes"]["ErrorMessage"]["StringValue"] == "Task timed out after 2.00 seconds"
    pids = json.loads(pid_file.read_text())
    wait_for(lambda: gone(pids["sandbox"]) and gone(pids["child"]), timeout=5, what="the sandbox tree to die")
    stats = service.stats()["functions"]["slow"]
    assert stats["timeout"] == 1 and stats["sandboxes"] == 0
    (stream,) = (service.log_dir / "slow").glob("*.log")
    text = stream.read_text()
    assert f"{request_id} Task timed out after 2.00 seconds" in text
    assert "Status: error\tError Type: Sandbox.Timedout" in text

    # Synchronously: a function error, and the next invocation needs a new sandbox (cold start).
    answer = lambda_client(service).invoke(FunctionName="slow", Payload=payload)
    body = json.loads(answer["Payload"].read())
    assert answer["FunctionError"] == "Unhandled"
    assert (body["errorType"], body["errorMessage"]) == (
        "Sandbox.Timedout",
        "Task timed out after 2.00 seconds",
    )
    assert service.stats()["functions"]["slow"]["cold_starts"] == 2


def test_memory_over_the_limit_is_killed_as_out_of_memory(
    start_service: StartService, moto_server: Moto, tmp_path: Path
) -> None:
    dlq_url, _ = moto_server.new_queue("dlq")
    fn = fixture_fn("hungry", "hog", memory_mb=256, timeout_s=30, dead_letter_queue_url=dlq_url)
    service = start_service(fn)
    client = lambda_client(service)
    pid_file = tmp_path / "pids.json"
    payload = json.dumps({"pid_file": str(pid_file), "mb": 1024})

    client.invoke(FunctionName="hungry", InvocationType="Event", Payload=payload)
    (message,) = moto_server.receive_all(dlq_url, 1, timeout=20)

    assert message["Body"] == payload
    error_message = message["MessageAttributes"]["ErrorMessage"]["StringValue"]
    assert error_message == "Runtime exited with error: signal: killed"
    assert gone(json.loads(pid_file.read_text())["sandbox"])

    # Synchronously, the error type says what happened.
    answer = client.invoke(FunctionName="hungry", Payload=payload)
    body = json.loads(answer["Payload"].read())
    assert answer["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Runtime.OutOfMemory"
    stats = service.stats()["functions"]["hungry"]
    assert stats["out_of_memory"] == 2 and stats["cold_starts"] == 2


def test_pages_shared_by_forked_processes_count_once(start_service: StartService) -> None:
    """Two processes sharing 200 MB use 200 MB, as Lambda counts them, not the 400 MB their resident sizes add up to."""
    service = start_service(fixture_fn("forks", "fork_sharing_memory", memory_mb=320, timeout_s=30))

    answer = lambda_client(service).invoke(
        FunctionName="forks", Payload=json.dumps({"mb": 200, "seconds": 1.5}), LogType="Tail"
    )

    assert "FunctionError" not in answer, answer["Payload"].read()
    assert json.loads(answer["Payload"].read()) == {"bytes": 200 * 1024 * 1024}
    assert service.stats()["functions"]["forks"]["out_of_memory"] == 0
    # The REPORT line's Max Memory Used is the same measure: the 200 MB once (and a Python runtime).
    tail = base64.b64decode(answer["LogResult"]).decode()
    assert 200 <= report_of(tail, request_id_of(answer))["Max Memory Used"] < 260


# -- management API -----------------------------------------------------------------------------------------


def test_management_api_round_trips(start_service: StartService, moto_server: Moto) -> None:
    dlq_url, dlq_arn = moto_server.new_queue("dlq")
    service = start_service()
    client = lambda_client(service)

    created = client.create_function(
        FunctionName="made-by-api",
        Runtime="python3.12",
        Role="arn:aws:iam::123456789012:role/any",
        Handler="hybrid_router.lambda_exec.handler.handler",
        Environment={"Variables": {"HYBRID_ROUTER_FORK_WORKLOADS": "sometimes"}},  # every run fails
        Code={"ZipFile": b"PK\x05\x06" + b"\x00" * 18},
        Timeout=5,
        MemorySize=512,
        DeadLetterConfig={"TargetArn": dlq_arn},
    )
    assert created["FunctionName"] == "made-by-api" and created["MemorySize"] == 512
    with pytest.raises(ClientError) as excinfo:
        client.create_function(
            FunctionName="made-by-api", Role="arn:aws:iam::123456789012:role/any", Code={"ZipFile": b"x"}
        )
    assert error_of(excinfo)[:2] == ("ResourceConflictException", 409)

    assert client.get_function(FunctionName="made-by-api")["Configuration"]["DeadLetterConfig"] == {
        "TargetArn": dlq_arn
    }
    assert client.get_function_configuration(FunctionName="made-by-api")["Timeout"] == 5
    assert (
        client.get_function_concurrency(FunctionName="made-by-api").get("ReservedConcurrentExecutions")
        is None
    )
    client.put_function_concurrency(FunctionName="made-by-api", ReservedConcurrentExecutions=3)
    assert client.get_function_concurrency(FunctionName="made-by-api")["ReservedConcurrentExecutions"] == 3
    assert client.get_function(FunctionName="made-by-api")["Concurrency"] == {
        "ReservedConcurrentExecutions": 3
    }
    client.delete_function_concurrency(FunctionName="made-by-api")
    assert "ReservedConcurrentExecutions" not in client.get_function_concurrency(FunctionName="made-by-api")

    put = client.put_function_event_invoke_config(
        FunctionName="made-by-api", MaximumRetryAttempts=0, MaximumEventAgeInSeconds=60
    )
    assert (put["MaximumRetryAttempts"], put["MaximumEventAgeInSeconds"]) == (0, 60)
    got = client.get_function_event_invoke_config(FunctionName="made-by-api")
    assert (got["MaximumRetryAttempts"], got["MaximumEventAgeInSeconds"]) == (0, 60)
    with pytest.raises(ClientError) as excinfo:
        client.put_function_event_invoke_config(FunctionName="made-by-api", MaximumEventAgeInSeconds=30_000)
    assert error_of(excinfo)[:2] == ("InvalidParameterValueException", 400)
    # Update changes only what it names; Put resets the rest to AWS's defaults.
    updated = client.update_function_event_invoke_config(FunctionName="made-by-api", MaximumRetryAttempts=1)
    assert (updated["MaximumRetryAttempts"], updated["MaximumEventAgeInSeconds"]) == (1, 60)
    reset = client.put_function_event_invoke_config(FunctionName="made-by-api", MaximumRetryAttempts=0)
    assert (reset["MaximumRetryAttempts"], reset["MaximumEventAgeInSeconds"]) == (0, 21600)
    # Destinations are not emulated: refused rather than accepted and ignored.
    with pytest.raises(ClientError) as excinfo:
        client.put_function_event_invoke_config(
            FunctionName="made-by-api", DestinationConfig={"OnFailure": {"Destination": dlq_arn}}
        )
    assert error_of(excinfo)[:2] == ("InvalidParameterValueException", 400)
    assert [f["FunctionName"] for f in client.list_functions()["Functions"]] == ["made-by-api"]

    # The failed run goes to the DLQ that was given as an ARN: the service resolves it on the SQS endpoint.
    arn = "arn:aws:lambda:us-east-1:123456789012:function:made-by-api"
    now = time.time()
    event = InvokeEvent("d1", TaskRef("dag", "task", "run", 1), "{}", dlq_url, now, now + 300)
    payload = protocol.seal_event(event, SECRET)
    client.invoke(FunctionName=arn, InvocationType="Event", Payload=payload)
    (message,) = moto_server.receive_all(dlq_url, 1, timeout=15)
    assert protocol.open_event(message["Body"], SECRET).dispatch_id == "d1"
    assert "HYBRID_ROUTER_FORK_WORKLOADS" in message["MessageAttributes"]["ErrorMessage"]["StringValue"]

    client.delete_function(FunctionName="made-by-api")
    with pytest.raises(ClientError) as excinfo:
        client.get_function(FunctionName="made-by-api")
    assert error_of(excinfo)[:2] == ("ResourceNotFoundException", 404)


# -- shutting down --------------------------------------------------------------------------------------------


def test_stop_leaves_no_sandbox_or_child_behind(start_service: StartService, tmp_path: Path) -> None:
    service = start_service(fixture_fn("lingering", "sleep_with_child", timeout_s=120))
    pid_file = tmp_path / "pids.json"
    lambda_client(service).invoke(
        FunctionName="lingering", InvocationType="Event", Payload=json.dumps({"pid_file": str(pid_file)})
    )
    wait_for(pid_file.exists, what="the handler to start")
    pids = json.loads(pid_file.read_text())
    service_pid = service.pid
    assert service_pid is not None

    begin = time.monotonic()
    service.stop()

    assert time.monotonic() - begin < 8, "SIGTERM is enough: the service stops its sandboxes itself"
    assert gone(service_pid)
    wait_for(lambda: gone(pids["sandbox"]) and gone(pids["child"]), timeout=5, what="no orphans")


ORPHAN_PARENT = """
import json, sys, time
import boto3
from hybrid_router.lambda_exec.local.faults import FaultConfigError, Faults, FaultSettings, Latency
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService

code_path, log_dir, pid_file = sys.argv[1:4]
fn = FunctionConfig("f", handler="fixture_handlers.sleep_with_child", code_path=code_path, memory_mb=256,
                    timeout_s=120)
service = LocalLambdaService(functions=[fn], log_dir=log_dir).start()
client = boto3.client("lambda", endpoint_url=service.url, region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
client.invoke(FunctionName="f", InvocationType="Event", Payload=json.dumps({"pid_file": pid_file}))
print(service.pid, flush=True)
time.sleep(600)
"""


def test_service_and_sandboxes_stop_when_the_starting_process_dies(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids.json"
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_PARENT, CODE_PATH, str(tmp_path / "logs"), str(pid_file)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **FAKE_AWS_ENV},
    )
    service_pid = None
    try:
        assert parent.stdout is not None
        service_pid = int(parent.stdout.readline())
        wait_for(pid_file.exists, what="the handler to start")
        pids = json.loads(pid_file.read_text())

        os.killpg(parent.pid, signal.SIGKILL)  # as when a test run is killed: no chance to clean up
        parent.wait(timeout=10)

        wait_for(lambda: gone(service_pid), timeout=15, what="the orphaned service to stop")
        wait_for(
            lambda: gone(pids["sandbox"]) and gone(pids["child"]), timeout=5, what="its sandboxes to stop"
        )
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if service_pid is not None and not gone(service_pid):
            os.killpg(service_pid, signal.SIGKILL)


# -- AWS-like latency and delivery faults (faults.py) ------------------------------------------------------


def test_each_async_invoke_waits_for_its_drawn_latency(start_service: StartService, tmp_path: Path) -> None:
    settings = FaultSettings(invoke_latency=Latency.from_median_ms(25), seed=7)
    service = start_service(fixture_fn("slow-api", "noop"), faults=settings)
    client = lambda_client(service)
    # The same seed draws the same delays: each answer comes no sooner than its own.
    reference = Faults(settings)
    expected = [reference.invoke_delay_s() for _ in range(12)]
    for delay in expected:
        began = time.monotonic()
        client.invoke(FunctionName="slow-api", InvocationType="Event", Payload=b"{}")
        assert time.monotonic() - began >= delay
    assert service.stats()["faults"]["settings"]["invoke_latency_ms"] == {"median_ms": 25.0, "p99_ms": 75.0}


@pytest.mark.parametrize("after_end", [False, True], ids=["at-once", "after-the-first-run"])
def test_duplicate_delivery_runs_an_accepted_event_twice(
    start_service: StartService, tmp_path: Path, after_end: bool
) -> None:
    service = start_service(fixture_fn("dup2", "record"))
    service.set_delivery_faults(
        settings=FaultSettings(duplicate_rate=1.0, duplicate_after_end_share=1.0 if after_end else 0.0)
    )
    record = tmp_path / "runs.jsonl"
    answer = lambda_client(service).invoke(
        FunctionName="dup2",
        InvocationType="Event",
        Payload=json.dumps({"record_file": str(record), "sleep": 0.5}),
    )
    runs = wait_for(lambda: len(read_lines(record)) >= 2 and read_lines(record), what="2 runs")
    assert {run["request_id"] for run in runs} == {request_id_of(answer)}
    first, second = sorted(runs, key=lambda run: run["start"])
    # At once: both copies run side by side; after the first run: the copy starts once the first has ended.
    assert (second["start"] >= first["end"]) is after_end
    faults = service.stats()["faults"]
    assert faults["duplicates_delivered"] == 1
    assert faults["duplicates_after_end"] == (1 if after_end else 0)


@pytest.mark.parametrize("mode", ["5xx", "reset"])
def test_a_lost_answer_hides_an_accepted_event_from_its_caller(
    start_service: StartService, tmp_path: Path, mode: str
) -> None:
    service = start_service(fixture_fn("lossy", "record"))
    service.set_delivery_faults(settings=FaultSettings(lost_answer_rate=1.0, lost_answer_mode=mode))
    record = tmp_path / "runs.jsonl"
    with pytest.raises((ClientError, ConnectionClosedError)) as raised:
        lambda_client(service).invoke(
            FunctionName="lossy", InvocationType="Event", Payload=json.dumps({"record_file": str(record)})
        )
    if mode == "5xx":
        assert error_of(raised)[:2] == ("ServiceException", 500)
    else:
        assert isinstance(raised.value, ConnectionClosedError)
    # The caller saw a failure, yet the event was accepted and runs.
    assert wait_for(lambda: read_lines(record), what="the run of the accepted event")
    assert service.stats()["faults"]["invoke_answers_lost"] == 1


def test_fault_settings_are_checked_and_named(start_service: StartService) -> None:
    service = start_service(fixture_fn("checked", "noop"))
    request = urllib.request.Request(
        service.url + "/_local/faults", data=json.dumps({"duplicate_rate": 2}).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 400
    assert "faults.duplicate_rate: expected a number from 0 to 1, got 2" in raised.value.read().decode()
    with pytest.raises(FaultConfigError, match=r"faults\.lost_answer_mode"):
        FaultSettings(lost_answer_mode="sometimes")


def test_the_latency_model_is_log_normal_with_the_asked_median_and_p99() -> None:
    faults = Faults(FaultSettings(invoke_latency=Latency.from_median_ms(25), seed=1))
    draws = sorted(faults.invoke_delay_s() for _ in range(20_000))
    assert draws[len(draws) // 2] == pytest.approx(0.025, rel=0.05)
    assert draws[int(len(draws) * 0.99)] == pytest.approx(0.075, rel=0.08)

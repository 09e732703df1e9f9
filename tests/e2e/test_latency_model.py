"""The benchmarks' latency model (devtools/latency.py): SQS receives pay the latency only when it is a round trip
of their own, every call is counted per process, and the model reaches the local Lambda service's sandboxes."""

from __future__ import annotations

import os
import textwrap
import time

import boto3

from devtools.aws_faults import SqsFaults, calls, install
from devtools.devstack import FAKE_AWS_ENV, wait_until
from devtools.latency import AWS_LIKE, LatencyModel
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService

# A fixed latency (p99 = median) long enough to tell apart from moto's own time on a loaded machine.
SLOW = SqsFaults(latency_median_ms=1500, latency_p99_factor=1.0)


def _timed(call, **kwargs) -> tuple[float, dict]:
    began = time.monotonic()
    answer = call(**kwargs)
    return time.monotonic() - began, answer


def test_a_receive_pays_the_latency_when_it_brings_messages_or_is_a_short_poll(moto_server):
    queue = moto_server.create_queue(f"latency-{time.monotonic_ns()}")
    client = moto_server.client("sqs")
    install(client.meta.events, SLOW)
    empty_long_poll, answer = _timed(client.receive_message, QueueUrl=queue, WaitTimeSeconds=1)
    assert "Messages" not in answer
    # All wait: 1 s of long poll, not 1 s + 1.5 s of latency.
    assert empty_long_poll < 2.4
    empty_short_poll, _ = _timed(client.receive_message, QueueUrl=queue, WaitTimeSeconds=0)
    assert empty_short_poll >= 1.5
    sent, _ = _timed(client.send_message, QueueUrl=queue, MessageBody="x")
    assert sent >= 1.5
    with_message, answer = _timed(client.receive_message, QueueUrl=queue, WaitTimeSeconds=1)
    assert [m["Body"] for m in answer["Messages"]] == ["x"]
    assert with_message >= 1.5


def test_every_call_is_counted_with_its_process_injected_failures_too(moto_server, tmp_path):
    queue = moto_server.create_queue(f"counted-{time.monotonic_ns()}")
    log = tmp_path / "calls.jsonl"
    client = moto_server.client("sqs")
    install(client.meta.events, SqsFaults(calls_log=str(log), outage_at=time.time(), outage_s=60))
    client.send_message(QueueUrl=queue, MessageBody="x")
    client.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])
    try:
        client.receive_message(QueueUrl=queue, WaitTimeSeconds=0)
    except client.exceptions.ClientError:
        pass  # the outage answered it: still a call its caller made
    expected = {"sqs.GetQueueAttributes": 1, "sqs.ReceiveMessage": 1, "sqs.SendMessage": 1}
    assert calls(log) == expected
    assert calls(log, {os.getpid()}) == expected
    assert calls(log, {os.getpid() + 1}) == {}


def test_the_model_sets_both_halves():
    model = LatencyModel(invoke_median_ms=30, sqs_median_ms=10, p99_factor=3)
    invoke = model.lambda_faults().invoke_latency
    assert invoke is not None and (invoke.median_s, invoke.p99_s) == (0.03, 0.09)
    sqs = model.sqs_faults(calls_log="calls.jsonl")
    assert (sqs.latency_median_ms, sqs.latency_p99_factor, sqs.calls_log) == (10, 3, "calls.jsonl")
    assert SqsFaults.from_json(model.process_env()["HYBRID_ROUTER_AWS_FAULTS"]).latency_median_ms == 10
    assert (AWS_LIKE.invoke_median_ms, AWS_LIKE.sqs_median_ms, AWS_LIKE.p99_factor) == (25, 8, 3)
    assert "25 ms" in AWS_LIKE.describe() and "8 ms" in AWS_LIKE.describe()


SEND_ONE = """
import boto3


def handler(event, context):
    boto3.client("sqs").send_message(QueueUrl=event["queue"], MessageBody="from the sandbox")
"""


def test_the_model_reaches_the_local_lambda_service_and_its_sandboxes(moto_server, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "send_one.py").write_text(textwrap.dedent(SEND_ONE))
    queue = moto_server.create_queue(f"sandbox-{time.monotonic_ns()}")
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, **FAKE_AWS_ENV, **AWS_LIKE.process_env(calls_log=str(log))}
    function = FunctionConfig("send-one", handler="send_one.handler", code_path=str(code), memory_mb=256)
    with LocalLambdaService(
        functions=[function],
        env=env,
        sqs_endpoint_url=moto_server.url,
        log_dir=tmp_path / "lambda-logs",
        faults=AWS_LIKE.lambda_faults(),
    ) as service:
        client = boto3.client(
            "lambda",
            endpoint_url=service.url,
            region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )
        client.invoke(FunctionName="send-one", InvocationType="Event", Payload=f'{{"queue": "{queue}"}}')
        wait_until(lambda: calls(log).get("sqs.SendMessage"), 60, "the sandbox's send")
        settings = service.stats()["faults"]["settings"]
    assert settings["invoke_latency_ms"] == {"median_ms": 25.0, "p99_ms": 75.0}
    # The send was made, with the model's hooks, by a process of the service's (a sandbox), not by this one.
    assert calls(log, {os.getpid()}) == {}
    assert moto_server.client("sqs").receive_message(QueueUrl=queue, WaitTimeSeconds=5)["Messages"]

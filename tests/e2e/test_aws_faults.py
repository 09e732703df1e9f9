"""The SQS fault and latency layer of the dev stack: botocore hooks, in this process and in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from botocore.exceptions import ClientError

from devtools.aws_faults import FaultsFile, SqsFaults, injected, install, process_env
from devtools.devstack import FAKE_AWS_ENV


def test_a_failed_send_is_what_its_caller_sees_and_nothing_is_sent(moto_server, tmp_path):
    queue = moto_server.create_queue(f"faults-{time.monotonic_ns()}")
    client = moto_server.client("sqs")
    log = tmp_path / "faults.jsonl"
    install(client.meta.events, SqsFaults(send_failure_rate=1.0, log_file=str(log)))
    with pytest.raises(ClientError) as raised:
        client.send_message(QueueUrl=queue, MessageBody="lost")
    assert raised.value.response["Error"]["Code"] == "InternalError"
    assert (
        moto_server.client("sqs").receive_message(QueueUrl=queue, WaitTimeSeconds=0).get("Messages") is None
    )
    assert injected(log) == {"send_failed": 1}


def test_receives_fail_only_inside_the_outage_windows(moto_server, tmp_path):
    queue = moto_server.create_queue(f"outage-{time.monotonic_ns()}")
    client = moto_server.client("sqs")
    now = time.time()
    # A 10 s period whose last 5 s are the outage: inside it now, then outside it.
    inside = SqsFaults(outage_every_s=10, outage_s=5, epoch=now - 6)
    outside = SqsFaults(outage_every_s=10, outage_s=5, epoch=now - 1)
    assert inside.in_outage(now) and not outside.in_outage(now)
    install(client.meta.events, inside)
    with pytest.raises(ClientError) as raised:
        client.receive_message(QueueUrl=queue, WaitTimeSeconds=0)
    assert raised.value.response["Error"]["Code"] == "ServiceUnavailable"
    calm = moto_server.client("sqs")
    install(calm.meta.events, outside)
    assert calm.receive_message(QueueUrl=queue, WaitTimeSeconds=0).get("Messages") is None


CHILD = """
import json, os, sys, time, boto3
client = boto3.client("sqs", endpoint_url=sys.argv[1], region_name="us-east-1")
began = time.monotonic()
for _ in range(20):
    client.get_queue_attributes(QueueUrl=sys.argv[2], AttributeNames=["All"])
failed = 0
try:
    client.send_message(QueueUrl=sys.argv[2], MessageBody="x")
except Exception:
    failed = 1
print(json.dumps({"seconds": time.monotonic() - began, "failed": failed}))
"""


def test_another_process_gets_the_faults_through_its_environment(moto_server, tmp_path):
    queue = moto_server.create_queue(f"child-{time.monotonic_ns()}")
    faults = SqsFaults(
        latency_median_ms=20, send_failure_rate=1.0, log_file=str(tmp_path / "f.jsonl"), seed=3
    )
    env = {**FAKE_AWS_ENV, **process_env(faults)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, moto_server.url, queue],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == 1
    # 20 calls at a 20 ms median latency each: at least 0.2 s in all, whatever the machine's speed.
    assert result["seconds"] >= 0.2
    assert injected(tmp_path / "f.jsonl") == {"send_failed": 1}


def _unreachable_client(service: str):
    """A client whose calls never leave the process when a fault answers them (nothing listens there)."""
    import boto3

    return boto3.client(service, endpoint_url="http://127.0.0.1:9", region_name="us-east-1", **_credentials())


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "aws_session_token": FAKE_AWS_ENV["AWS_SESSION_TOKEN"],
    }


def test_expired_credentials_refuse_lambda_and_sqs_calls_as_aws_does(tmp_path):
    from hybrid_router.lambda_exec.aws import AwsErrorKind, classify_error

    log = tmp_path / "faults.jsonl"
    faults = SqsFaults(credentials_expired_at=time.time(), credentials_expired_s=60, log_file=str(log))
    lambda_client, sqs = _unreachable_client("lambda"), _unreachable_client("sqs")
    install(lambda_client.meta.events, faults)
    install(sqs.meta.events, faults)
    with pytest.raises(ClientError) as invoke:
        lambda_client.invoke(FunctionName="f", InvocationType="Event", Payload=b"{}")
    with pytest.raises(ClientError) as receive:
        sqs.receive_message(QueueUrl="http://127.0.0.1:9/123456789012/q", WaitTimeSeconds=0)
    assert invoke.value.response["Error"]["Code"] == "ExpiredTokenException"
    assert receive.value.response["Error"]["Code"] == "ExpiredToken"
    # The product takes both for what they are: refused for the credentials, so nothing was accepted.
    assert classify_error(invoke.value).kind is AwsErrorKind.CREDENTIALS
    assert classify_error(receive.value).kind is AwsErrorKind.CREDENTIALS
    assert injected(log) == {"credentials_expired": 2}
    assert injected(log, by="operation") == {"lambda.Invoke": 1, "sqs.ReceiveMessage": 1}


def test_the_one_off_windows_cover_their_seconds_only():
    now = time.time()
    faults = SqsFaults(outage_at=now, outage_s=5, credentials_expired_at=now + 10, credentials_expired_s=2)
    assert [faults.in_outage(now + dt) for dt in (-0.1, 0, 4.9, 5)] == [False, True, True, False]
    assert [faults.credentials_expired(now + dt) for dt in (9.9, 10, 11.9, 12)] == [False, True, True, False]


def test_a_faults_file_switches_the_faults_of_running_clients(moto_server, tmp_path):
    queue = moto_server.create_queue(f"switch-{time.monotonic_ns()}")
    control = FaultsFile(tmp_path / "faults.json")
    client = moto_server.client("sqs")
    install(client.meta.events, control)
    client.send_message(QueueUrl=queue, MessageBody="no file: no faults")
    control.write(SqsFaults(send_failure_rate=1.0))
    with pytest.raises(ClientError):
        client.send_message(QueueUrl=queue, MessageBody="lost")
    control.write(SqsFaults(outage_at=time.time(), outage_s=60))
    client.send_message(QueueUrl=queue, MessageBody="sent again")
    with pytest.raises(ClientError):
        client.receive_message(QueueUrl=queue, WaitTimeSeconds=0)
    control.write(SqsFaults())
    bodies = {m["Body"] for m in client.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]}
    assert bodies == {"no file: no faults", "sent again"}


def test_another_process_follows_a_faults_file(moto_server, tmp_path):
    queue = moto_server.create_queue(f"child-file-{time.monotonic_ns()}")
    control = FaultsFile(tmp_path / "faults.json")
    control.write(SqsFaults(send_failure_rate=1.0, log_file=str(tmp_path / "f.jsonl")))
    env = {**FAKE_AWS_ENV, **process_env(control)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, moto_server.url, queue],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["failed"] == 1
    assert injected(tmp_path / "f.jsonl") == {"send_failed": 1}

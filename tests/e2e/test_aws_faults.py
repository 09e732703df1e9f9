"""The SQS fault and latency layer of the dev stack: botocore hooks, in this process and in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from botocore.exceptions import ClientError

from devtools.aws_faults import SqsFaults, injected, install, process_env
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

"""Real servers for the Lambda-path tests: moto's server for SQS, on a free loopback port."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from devtools.devstack import MotoServer

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
SECRET = "test-signing-secret"


class Moto:
    def __init__(self, url: str):
        self.url = url

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def new_queue(self, prefix: str = "q") -> tuple[str, str]:
        """A fresh queue (url, arn): new names instead of purges, which moto limits to one a minute."""
        sqs = self.client("sqs")
        url = sqs.create_queue(QueueName=f"{prefix}-{uuid.uuid4().hex[:10]}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        return url, arn

    def receive_all(self, queue_url: str, expected: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Receive (and delete) messages until ``expected`` arrived or the timeout passed."""
        sqs = self.client("sqs")
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(messages) < expected and time.monotonic() < deadline:
            wait = max(0, min(2, int(deadline - time.monotonic())))
            resp = sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=wait,
                MessageAttributeNames=["All"],
            )
            for message in resp.get("Messages", []):
                messages.append(message)
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        return messages


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    with MotoServer(log_dir=tmp_path_factory.mktemp("moto")) as server:
        yield Moto(server.url)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, moto_server: Moto) -> dict[str, str]:
    """This process's AWS settings pointed at moto (what a Lambda sandbox would see)."""
    env = {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL_SQS": moto_server.url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env

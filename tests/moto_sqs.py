"""moto's server as the tests share it: the dev stack's ``MotoServer`` plus the SQS helpers the Lambda tests use.

One server runs for the whole session (the ``moto_server`` fixture in ``tests/conftest.py``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from devtools.devstack import MotoServer


class Moto(MotoServer):
    """``MotoServer`` with fresh queues and a receive-everything helper."""

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

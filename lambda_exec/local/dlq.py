"""Dead-letter queues: a failed asynchronous event sent to SQS in the format AWS Lambda uses.

The message body is the event's payload exactly as the invoker sent it; the attributes are ``RequestID``
(String), ``ErrorCode`` (Number: the invocation's status, 200 when the function ran and failed) and
``ErrorMessage`` (String, the first 1 KB of the error message).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from hybrid_router.lambda_exec.local import errors

ERROR_MESSAGE_LIMIT = 1024


class DeadLetterQueues:
    """Sends to DLQs named by queue URL or (as ``DeadLetterConfig.TargetArn``) by queue ARN."""

    def __init__(
        self,
        region: str,
        account_id: str,
        endpoint_url: str | None,
        client_factory: Callable[[], Any] | None = None,
    ):
        self.region = region
        self.account_id = account_id
        self.endpoint_url = endpoint_url
        self._client_factory = client_factory or self._default_client
        self._client: Any = None
        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()

    def send(self, target: str, payload: str, request_id: str, error_code: str, error_message: str) -> None:
        """Send one dead letter; raises what botocore raises once its own retries are spent."""
        self.client().send_message(
            QueueUrl=self.queue_url(target),
            MessageBody=payload,
            MessageAttributes={
                "RequestID": {"DataType": "String", "StringValue": request_id},
                "ErrorCode": {"DataType": "Number", "StringValue": error_code},
                "ErrorMessage": {"DataType": "String", "StringValue": first_kb(error_message)},
            },
        )

    def queue_url(self, target: str) -> str:
        if not target.startswith("arn:"):
            return target
        with self._lock:
            url = self._urls.get(target)
        if url is None:
            parts = target.split(":")
            if len(parts) != 6 or parts[2] != "sqs":
                raise errors.InvalidParameterValueException(
                    f"DeadLetterConfig.TargetArn: not an SQS ARN: {target}"
                )
            answer = self.client().get_queue_url(QueueName=parts[5], QueueOwnerAWSAccountId=parts[4])
            url = answer["QueueUrl"]
            with self._lock:
                self._urls[target] = url
        return url

    def queue_arn(self, target: str) -> str:
        """The ARN AWS shows in ``DeadLetterConfig.TargetArn`` for a queue given by URL or ARN."""
        if target.startswith("arn:"):
            return target
        parts = target.rstrip("/").split("/")
        account, name = (parts[-2], parts[-1]) if len(parts) >= 2 else (self.account_id, parts[-1])
        return f"arn:aws:sqs:{self.region}:{account}:{name}"

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client

    def _default_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "sqs",
            endpoint_url=self.endpoint_url or None,
            region_name=self.region,
            config=Config(retries={"mode": "standard", "max_attempts": 5}),
        )


def first_kb(text: str) -> str:
    return text.encode("utf-8")[:ERROR_MESSAGE_LIMIT].decode("utf-8", errors="ignore")

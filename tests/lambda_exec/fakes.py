"""Scriptable stand-ins for the boto clients, for unit tests that drive time and answers exactly.

Integration tests use moto's SQS server and the local Lambda service instead.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from typing import Any

from botocore.exceptions import ClientError

from hybrid_router.lambda_exec.aws import AwsClients


def client_error(code: str, status: int, message: str = "", operation: str = "Invoke") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message or code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


class FakeLambda:
    """Answers 202 unless an answer (an exception) was queued with ``answer``.

    ``failing`` maps a start-up operation's name (``get_function``...) to the exception it raises.
    """

    def __init__(
        self,
        timeout_s: int = 60,
        reserved: int | None = None,
        retry_attempts: int = 0,
        memory_mb: int | None = None,
    ):
        self.invokes: list[dict[str, Any]] = []
        self._answers: deque[BaseException | None] = deque()
        self._lock = threading.Lock()
        self.timeout_s = timeout_s
        self.reserved = reserved
        self.retry_attempts = retry_attempts
        self.memory_mb = memory_mb
        self.failing: dict[str, BaseException] = {}

    def answer(self, *answers: BaseException | None) -> None:
        self._answers.extend(answers)

    gate: threading.Event | None = None  # when set, invokes wait for it before answering

    def invoke(self, **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            self.invokes.append(kwargs)
            answer = self._answers.popleft() if self._answers else None
        if self.gate is not None:
            self.gate.wait(10)
        if answer is not None:
            raise answer
        return {
            "StatusCode": 202,
            "ResponseMetadata": {"RequestId": str(uuid.uuid4()), "HTTPStatusCode": 202},
        }

    def _fail_if_asked(self, operation: str) -> None:
        if operation in self.failing:
            raise self.failing[operation]

    def get_function(self, **kwargs: Any) -> dict[str, Any]:
        self._fail_if_asked("get_function")
        configuration = {"FunctionName": kwargs["FunctionName"], "Timeout": self.timeout_s}
        if self.memory_mb is not None:
            configuration["MemorySize"] = self.memory_mb
        return {"Configuration": configuration}

    def get_function_concurrency(self, **kwargs: Any) -> dict[str, Any]:
        self._fail_if_asked("get_function_concurrency")
        return {"ReservedConcurrentExecutions": self.reserved} if self.reserved else {}

    def get_function_event_invoke_config(self, **kwargs: Any) -> dict[str, Any]:
        self._fail_if_asked("get_function_event_invoke_config")
        return {"MaximumRetryAttempts": self.retry_attempts}

    closed = False

    def close(self) -> None:
        self.closed = True


class FakeSqs:
    """Per-queue lists of messages; receive hands out what is visible, like SQS without the network."""

    def __init__(self, *, redeliver_released: bool = False, visibility_scale: float = 0.01) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[dict[str, Any]]] = {}
        # With redelivery, a released message becomes visible again after its visibility timeout (scaled down:
        # 30 s -> 0.3 s) with a higher receive count, as SQS does for the next reader.
        self._redeliver = redeliver_released
        self._scale = visibility_scale
        self._received: dict[str, tuple[str, dict[str, Any]]] = {}
        self._hidden: list[tuple[float, str, dict[str, Any]]] = []
        self._ids = itertools.count(1)
        self.deleted: list[str] = []
        self.released: list[str] = []
        self.release_timeouts: list[tuple[str, int]] = []  # (receipt handle, VisibilityTimeout) per release
        self.receives = 0
        self.missing_queues: set[str] = set()  # get_queue_attributes answers NonExistentQueue for these

    def send(
        self,
        queue_url: str,
        body: str,
        *,
        receive_count: int = 1,
        attributes: dict[str, str] | None = None,
        sent_at: float | None = None,
    ):
        message_id = f"m{next(self._ids)}"
        sent_ms = int((time.time() if sent_at is None else sent_at) * 1000)
        message = {
            "MessageId": message_id,
            "ReceiptHandle": f"rh-{message_id}",
            "Body": body,
            "Attributes": {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": str(sent_ms)},
            "MessageAttributes": {
                name: {"DataType": "String", "StringValue": value}
                for name, value in (attributes or {}).items()
            },
        }
        with self._lock:
            self._queues.setdefault(queue_url, deque()).append(message)
        return message_id

    def receive_message(self, **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            self.receives += 1
            now = time.monotonic()
            for item in [h for h in self._hidden if h[0] <= now]:
                self._hidden.remove(item)
                self._queues[item[1]].append(item[2])
            queue = self._queues.setdefault(kwargs["QueueUrl"], deque())
            batch = [queue.popleft() for _ in range(min(len(queue), kwargs.get("MaxNumberOfMessages", 1)))]
            for message in batch:
                self._received[message["ReceiptHandle"]] = (kwargs["QueueUrl"], message)
        if not batch:
            time.sleep(min(0.05, kwargs.get("WaitTimeSeconds", 0)))
        return {"Messages": batch} if batch else {}

    def delete_message_batch(self, **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            self.deleted.extend(entry["ReceiptHandle"] for entry in kwargs["Entries"])
        return {"Successful": [{"Id": entry["Id"]} for entry in kwargs["Entries"]]}

    def change_message_visibility_batch(self, **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            self.released.extend(entry["ReceiptHandle"] for entry in kwargs["Entries"])
            self.release_timeouts.extend(
                (e["ReceiptHandle"], e["VisibilityTimeout"]) for e in kwargs["Entries"]
            )
            if self._redeliver:
                for entry in kwargs["Entries"]:
                    queue_url, message = self._received[entry["ReceiptHandle"]]
                    count = int(message["Attributes"]["ApproximateReceiveCount"]) + 1
                    message["Attributes"]["ApproximateReceiveCount"] = str(count)
                    visible_at = time.monotonic() + entry["VisibilityTimeout"] * self._scale
                    self._hidden.append((visible_at, queue_url, message))
        return {"Successful": [{"Id": entry["Id"]} for entry in kwargs["Entries"]]}

    def get_queue_attributes(self, **kwargs: Any) -> dict[str, Any]:
        if kwargs["QueueUrl"] in self.missing_queues:
            raise client_error("AWS.SimpleQueueService.NonExistentQueue", 400, operation="GetQueueAttributes")
        return {"Attributes": {"QueueArn": "arn:aws:sqs:us-east-1:000000000000:q"}}

    closed = False

    def close(self) -> None:
        self.closed = True


def fake_clients(lambda_: FakeLambda | None = None, sqs: FakeSqs | None = None) -> AwsClients:
    lambda_ = lambda_ or FakeLambda()
    sqs = sqs or FakeSqs()
    return AwsClients(lambda_=lambda_, sqs=sqs, all=(lambda_, sqs))


class FakeClock:
    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

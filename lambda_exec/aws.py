"""The boundary with AWS: every boto call the executor side makes, with its errors and answers typed here.

Nothing outside this module calls a boto client, looks inside a response dict or catches a botocore error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from hybrid_router.lambda_exec.protocol import Outcome

if TYPE_CHECKING:
    from hybrid_router.lambda_exec.config import LambdaExecutorConfig

log = logging.getLogger(__name__)

# Refused before Lambda looked at the request (missing, expired or invalid credentials, no permission): the event
# was certainly not accepted, and refreshed credentials (or a propagated IAM change) may succeed.
_CREDENTIAL_ERRORS = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "AccessDeniedException",
        "AccessDenied",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
    }
)
_THROTTLE_ERRORS = frozenset({"TooManyRequestsException", "ThrottlingException", "Throttling"})
_RETRYABLE_ERRORS = frozenset({"ServiceException", "ResourceNotReadyException", "EC2ThrottledException"})
# SQS takes at most this many entries in one batch call (and returns at most this many messages).
SQS_BATCH_MAX = 10
# Asked of every receive: the receive count bounds retries, the timestamps say how old a message is.
_SYSTEM_ATTRIBUTES = ("ApproximateReceiveCount", "SentTimestamp", "ApproximateFirstReceiveTimestamp")


# -- clients -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsClients:
    """The clients one executor instance uses, created once in ``start()`` and shared by its threads."""

    lambda_: Any
    sqs: Any
    all: tuple[Any, ...]


def make_clients(config: LambdaExecutorConfig) -> AwsClients:
    """Create the Lambda and SQS clients for ``config``, with the credentials of ``aws_conn_id``.

    The Lambda client does not retry by itself: a 429 must reach the executor at once (it stops invoking and
    reports no free capacity), and 5xx answers are retried by the executor with jittered back-off, off the
    scheduler loop. The SQS client keeps botocore's standard retries.
    """
    from botocore.config import Config

    session = _session(config)
    pool = config.max_invoke_workers + 4
    lambda_client = session.client(
        "lambda",
        endpoint_url=config.lambda_endpoint_url or None,
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=pool,
            connect_timeout=5,
            read_timeout=30,
        ),
        **_region(config),
    )
    sqs_client = session.client(
        "sqs",
        endpoint_url=config.sqs_endpoint_url or None,
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=pool,
            connect_timeout=5,
            # A long poll holds the connection for up to poll_wait_seconds.
            read_timeout=config.poll_wait_seconds + 20,
        ),
        **_region(config),
    )
    return AwsClients(lambda_=lambda_client, sqs=sqs_client, all=(lambda_client, sqs_client))


def make_logs_client(config: LambdaExecutorConfig) -> Any:
    """A CloudWatch Logs client with the same credentials as the Lambda and SQS clients (``aws_conn_id``)."""
    from botocore.config import Config

    # The API server reads logs while rendering a page: fail fast rather than retry.
    return _session(config).client(
        "logs",
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5),
        **_region(config),
    )


def _session(config: LambdaExecutorConfig) -> Any:
    """A boto3 session with the Airflow connection's credentials, or boto3's default chain without one."""
    import boto3

    if not config.aws_conn_id:
        return boto3.session.Session()
    try:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsGenericHook
    except ImportError:
        log.warning(
            "aws_conn_id %r is set but the Amazon provider is not installed; using boto3's default "
            "credentials. Install apache-airflow-providers-amazon to use Airflow connections.",
            config.aws_conn_id,
        )
        return boto3.session.Session()
    hook = AwsGenericHook(aws_conn_id=config.aws_conn_id, region_name=config.region_name or None)
    return hook.get_session(region_name=config.region_name or None)


def _region(config: LambdaExecutorConfig) -> dict[str, str]:
    return {"region_name": config.region_name} if config.region_name else {}


# -- errors ------------------------------------------------------------------------------------------------------


class AwsErrorKind(str, Enum):
    """What a failed call tells: whether AWS certainly refused it, and whether trying again can help."""

    THROTTLED = "throttled"  # 429: certainly refused; try again later, report no free capacity meanwhile
    CREDENTIALS = "credentials"  # certainly refused for the credentials; they may refresh: as THROTTLED
    RETRYABLE = "retryable"  # 5xx or a network failure: try again later; the request may have been accepted
    REJECTED = "rejected"  # any other 4xx: certainly refused, and sending it again is not expected to help
    UNEXPECTED = "unexpected"  # not an AWS answer (a bug?): the request may have been sent; not retried


@dataclass(frozen=True)
class AwsError:
    """A failed AWS call: what to do about it, AWS's error code (or the exception's name) and message."""

    kind: AwsErrorKind
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class AwsCallError(Exception):
    """Raised by the calls below that the caller cannot go on without; ``error`` says what went wrong."""

    def __init__(self, operation: str, error: AwsError):
        super().__init__(f"{operation} failed: {error}")
        self.operation = operation
        self.error = error


def classify_error(exc: BaseException) -> AwsError:
    """Sort an exception raised by a boto call into what the caller does about it."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        CredentialRetrievalError,
        NoCredentialsError,
        PartialCredentialsError,
        SSOError,
        TokenRetrievalError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    # First: these are no ClientError (no ``.response`` to read), and boto raises them before sending anything.
    no_credentials = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError, SSOError)
    if isinstance(exc, (*no_credentials, TokenRetrievalError)):
        return AwsError(AwsErrorKind.CREDENTIALS, type(exc).__name__, f"AWS credentials: {exc}")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {}) or {}
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", "")) or str(exc)
        status = int((exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        if code in _THROTTLE_ERRORS or status == 429:
            return AwsError(AwsErrorKind.THROTTLED, code, message)
        if status >= 500 or code in _RETRYABLE_ERRORS:
            return AwsError(AwsErrorKind.RETRYABLE, code, message)
        if code in _CREDENTIAL_ERRORS:
            return AwsError(AwsErrorKind.CREDENTIALS, code, f"AWS credentials or permissions: {message}")
        return AwsError(AwsErrorKind.REJECTED, code, message)
    if isinstance(exc, (BotoConnectionError, BotoCoreError, OSError)):
        return AwsError(AwsErrorKind.RETRYABLE, type(exc).__name__, str(exc))
    return AwsError(AwsErrorKind.UNEXPECTED, type(exc).__name__, str(exc))


def _call(operation: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """One boto call; a botocore error becomes an ``AwsCallError`` naming the operation."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return operation(**kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise AwsCallError(getattr(operation, "__name__", "AWS call"), classify_error(exc)) from exc


def _function(function_name: str, qualifier: str) -> dict[str, str]:
    return {"FunctionName": function_name, **({"Qualifier": qualifier} if qualifier else {})}


# -- Lambda ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSettings:
    timeout_s: int | None
    memory_mb: int | None


@dataclass(frozen=True)
class EventInvokeSettings:
    maximum_retry_attempts: int | None  # None: not set in the config (Lambda's default is 2)
    maximum_event_age_s: int | None


@dataclass(frozen=True)
class InvokeAccepted:
    request_id: str  # Lambda gives the run the same id (``aws_request_id``)


def describe_function(lambda_client: Any, function_name: str, qualifier: str = "") -> FunctionSettings:
    """``GetFunction``: the settings the executor needs. Raises ``AwsCallError``."""
    configuration = (
        _call(lambda_client.get_function, **_function(function_name, qualifier)).get("Configuration") or {}
    )
    return FunctionSettings(
        timeout_s=_int_or_none(configuration.get("Timeout")),
        memory_mb=_int_or_none(configuration.get("MemorySize")),
    )


def event_invoke_settings(lambda_client: Any, function_name: str, qualifier: str = "") -> EventInvokeSettings:
    """``GetFunctionEventInvokeConfig``; raises ``AwsCallError``, also when the function has no such config."""
    response = _call(lambda_client.get_function_event_invoke_config, **_function(function_name, qualifier))
    return EventInvokeSettings(
        maximum_retry_attempts=_int_or_none(response.get("MaximumRetryAttempts")),
        maximum_event_age_s=_int_or_none(response.get("MaximumEventAgeInSeconds")),
    )


def reserved_concurrency(lambda_client: Any, function_name: str) -> int | None:
    """``GetFunctionConcurrency``: the function's reserved concurrency, None without one. Raises ``AwsCallError``."""
    response = _call(lambda_client.get_function_concurrency, FunctionName=function_name)
    return _int_or_none(response.get("ReservedConcurrentExecutions"))


def invoke_async(
    lambda_client: Any, function_name: str, qualifier: str, payload: str
) -> InvokeAccepted | AwsError:
    """One ``Invoke(InvocationType=Event)``; every failure comes back as an ``AwsError``, never raised."""
    try:
        response = lambda_client.invoke(
            InvocationType="Event", Payload=payload.encode("utf-8"), **_function(function_name, qualifier)
        )
    except Exception as exc:  # runs in a pool thread: whatever went wrong must reach the scheduler thread
        return classify_error(exc)
    meta = response.get("ResponseMetadata") or {}
    headers = meta.get("HTTPHeaders") or {}
    return InvokeAccepted(str(meta.get("RequestId") or headers.get("x-amzn-requestid") or ""))


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


# -- SQS ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueMessage:
    """One SQS message as received, with the fields the executor reads."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    attributes: dict[str, str]  # message attributes (string values), e.g. a DLQ's ErrorCode / ErrorMessage
    # When SQS took the message (its SentTimestamp, else ApproximateFirstReceiveTimestamp), in epoch seconds by
    # SQS's clock; None when SQS gave neither.
    sent_at: float | None = None


def check_queue(sqs_client: Any, queue_url: str) -> None:
    """Raise ``AwsCallError`` unless the queue exists and these credentials may read it."""
    _call(sqs_client.get_queue_attributes, QueueUrl=queue_url, AttributeNames=["QueueArn"])


def receive_messages(
    sqs_client: Any, queue_url: str, *, wait_seconds: int, visibility_timeout: int
) -> list[QueueMessage]:
    """One long-polling receive of up to ``SQS_BATCH_MAX`` messages with their receive counts and attributes."""
    response = sqs_client.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=SQS_BATCH_MAX,
        WaitTimeSeconds=wait_seconds,
        VisibilityTimeout=visibility_timeout,
        MessageSystemAttributeNames=list(_SYSTEM_ATTRIBUTES),
        MessageAttributeNames=["All"],
    )
    messages = []
    for raw in response.get("Messages") or []:
        system = raw.get("Attributes") or {}
        attributes = {
            name: str(value.get("StringValue", ""))
            for name, value in (raw.get("MessageAttributes") or {}).items()
            if isinstance(value, dict)
        }
        try:
            receive_count = int(system.get("ApproximateReceiveCount", "1"))
        except ValueError:
            receive_count = 1
        messages.append(
            QueueMessage(
                message_id=str(raw.get("MessageId", "")),
                receipt_handle=str(raw["ReceiptHandle"]),
                body=str(raw.get("Body", "")),
                receive_count=receive_count,
                attributes=attributes,
                sent_at=_epoch_ms(system.get("SentTimestamp"))
                or _epoch_ms(system.get("ApproximateFirstReceiveTimestamp")),
            )
        )
    return messages


def _epoch_ms(value: Any) -> float | None:
    try:
        return int(value) / 1000.0 if value else None
    except (TypeError, ValueError):
        return None


def delete_messages(sqs_client: Any, queue_url: str, receipt_handles: list[str]) -> list[str]:
    """Delete in batches; returns a readable line for each message SQS could not delete."""
    return _in_batches(sqs_client.delete_message_batch, queue_url, receipt_handles)


def change_visibility(
    sqs_client: Any, queue_url: str, receipt_handles: list[str], *, visibility_timeout: int
) -> list[str]:
    """Hide (or, with 0, show) messages again in batches; returns a line for each one SQS could not change."""
    return change_visibility_each(sqs_client, queue_url, dict.fromkeys(receipt_handles, visibility_timeout))


def change_visibility_each(sqs_client: Any, queue_url: str, timeouts: Mapping[str, int]) -> list[str]:
    """Give each message (by receipt handle) its own visibility timeout, in batches; failures as above."""
    return _in_batches(
        sqs_client.change_message_visibility_batch,
        queue_url,
        list(timeouts),
        lambda handle: {"VisibilityTimeout": timeouts[handle]},
    )


def _in_batches(
    operation: Callable[..., dict[str, Any]],
    queue_url: str,
    handles: list[str],
    extra: Callable[[str], dict[str, Any]] = lambda _handle: {},
) -> list[str]:
    failures = []
    for start in range(0, len(handles), SQS_BATCH_MAX):
        chunk = handles[start : start + SQS_BATCH_MAX]
        response = operation(
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": handle, **extra(handle)} for i, handle in enumerate(chunk)
            ],
        )
        failures.extend(
            f"{entry.get('Id')}: {entry.get('Code')} {entry.get('Message', '')}".strip()
            for entry in response.get("Failed") or []
        )
    return failures


# -- CloudWatch Logs ---------------------------------------------------------------------------------------------


def filter_log_messages(logs_client: Any, log_group: str, request_id: str, *, limit: int) -> list[str]:
    """The messages of ``log_group`` that mention ``request_id`` (one page). Raises ``AwsCallError``."""
    response = _call(
        logs_client.filter_log_events, logGroupName=log_group, filterPattern=f'"{request_id}"', limit=limit
    )
    return [str(event.get("message", "")).rstrip("\n") for event in response.get("events") or []]


# -- DLQ classification -----------------------------------------------------------------------------------------

_TIMEOUT_RE = re.compile(r"task timed out after", re.IGNORECASE)
_OOM_RE = re.compile(r"outofmemory|out of memory|memory size exceeded|signal: killed", re.IGNORECASE)
_EXPIRED_RE = re.compile(r"eventageexceeded|event age|maximum event age", re.IGNORECASE)
_CRASH_RE = re.compile(r"runtime\.|runtime exited|exit status|signal:|unhandled", re.IGNORECASE)


def classify_dead_letter(error_code: str, error_message: str) -> Outcome:
    """What killed a run, from the ``ErrorCode`` / ``ErrorMessage`` attributes Lambda puts on a DLQ message.

    Lambda writes e.g. ``Task timed out after 5.00 seconds``, or ``Runtime exited with error: signal: killed``
    with ``Runtime.OutOfMemory`` for a run over its memory size. Order matters: an out-of-memory kill is also a
    runtime exit, and an event that aged out after a failed run is classified by that run's error.
    """
    text = f"{error_code} {error_message}"
    # ErrorCode is the invocation's status: 429 means the event aged out waiting and never ran.
    if error_code.strip() == "429" or (_EXPIRED_RE.search(text) and "last error" not in text):
        return Outcome.EVENT_EXPIRED
    if _TIMEOUT_RE.search(text):
        return Outcome.TIMEOUT
    if _OOM_RE.search(text):
        return Outcome.OUT_OF_MEMORY
    if _EXPIRED_RE.search(text):
        return Outcome.EVENT_EXPIRED
    if _CRASH_RE.search(text):
        return Outcome.RUNTIME_CRASH
    return Outcome.DEAD_LETTERED

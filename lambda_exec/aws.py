"""The boundary with AWS: boto clients, error classification and parsing of responses into typed objects.

Nothing outside this module looks inside a boto response dict or a ``ClientError``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from hybrid_router.lambda_exec.protocol import Outcome

if TYPE_CHECKING:
    from hybrid_router.lambda_exec.config import LambdaExecutorConfig

log = logging.getLogger(__name__)

# Lambda answers these for a request that can never succeed as sent; the task fails at once.
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


@dataclass(frozen=True)
class AwsClients:
    """The clients one executor instance uses, created once in ``start()`` and shared by its threads."""

    lambda_: Any
    sqs: Any
    all: tuple[Any, ...]


def make_clients(config: LambdaExecutorConfig) -> AwsClients:
    """Create the Lambda and SQS clients for ``config``.

    The Lambda client does not retry by itself: a 429 must reach the executor at once (it stops invoking and
    reports no free capacity), and 5xx answers are retried by the executor with jittered back-off, off the
    scheduler loop. The SQS client keeps botocore's standard retries.
    """
    from botocore.config import Config

    session = _session(config)
    common: dict[str, Any] = {}
    if config.region_name:
        common["region_name"] = config.region_name
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
        **common,
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
        **common,
    )
    return AwsClients(lambda_=lambda_client, sqs=sqs_client, all=(lambda_client, sqs_client))


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


# -- invoke errors ---------------------------------------------------------------------------------------------


class InvokeErrorKind(str, Enum):
    THROTTLED = "throttled"  # 429: try again later, report no free capacity meanwhile
    RETRYABLE = "retryable"  # 5xx or a network failure: try again later
    REJECTED = "rejected"  # any other 4xx, missing credentials: the task fails with the reason


@dataclass(frozen=True)
class InvokeError:
    kind: InvokeErrorKind
    code: str
    message: str


def classify_invoke_error(exc: BaseException) -> InvokeError:
    """Sort an exception raised by ``Lambda.Invoke`` into what the executor does about it."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return InvokeError(InvokeErrorKind.REJECTED, type(exc).__name__, f"AWS credentials: {exc}")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {}) or {}
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", "")) or str(exc)
        status = int((exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        if code in _THROTTLE_ERRORS or status == 429:
            return InvokeError(InvokeErrorKind.THROTTLED, code, message)
        if status >= 500 or code in (
            "ServiceException",
            "ResourceNotReadyException",
            "EC2ThrottledException",
        ):
            return InvokeError(InvokeErrorKind.RETRYABLE, code, message)
        if code in _CREDENTIAL_ERRORS:
            return InvokeError(InvokeErrorKind.REJECTED, code, f"AWS credentials or permissions: {message}")
        return InvokeError(InvokeErrorKind.REJECTED, code, message)
    if isinstance(exc, (BotoConnectionError, BotoCoreError, OSError)):
        return InvokeError(InvokeErrorKind.RETRYABLE, type(exc).__name__, str(exc))
    return InvokeError(InvokeErrorKind.REJECTED, type(exc).__name__, str(exc))


def invoke_request_id(response: dict[str, Any]) -> str:
    """The request id of an accepted async invoke; Lambda gives the run the same id (``aws_request_id``)."""
    meta = response.get("ResponseMetadata") or {}
    headers = meta.get("HTTPHeaders") or {}
    return str(meta.get("RequestId") or headers.get("x-amzn-requestid") or "")


# -- SQS messages ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueMessage:
    """One SQS message as received, with the fields the executor reads."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    attributes: dict[str, str]  # message attributes (string values), e.g. a DLQ's ErrorCode / ErrorMessage


def parse_receive_response(response: dict[str, Any]) -> list[QueueMessage]:
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
            )
        )
    return messages


def batch_failures(response: dict[str, Any]) -> list[str]:
    """Readable lines for the entries an SQS batch call could not handle."""
    return [
        f"{entry.get('Id')}: {entry.get('Code')} {entry.get('Message', '')}".strip()
        for entry in response.get("Failed") or []
    ]


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

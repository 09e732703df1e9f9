"""``aws.py`` against real boto clients: answers parsed into typed results, errors mapped at the boundary.

Botocore's ``Stubber`` plays AWS's answers (errors included) through the real client and its response parser; the
credential tests build real clients from an Airflow connection or from no credentials at all.
"""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    UnauthorizedSSOTokenError,
)
from botocore.stub import Stubber

from hybrid_router.lambda_exec import aws
from hybrid_router.lambda_exec.aws import (
    AwsCallError,
    AwsError,
    AwsErrorKind,
    EventInvokeSettings,
    FunctionSettings,
    InvokeAccepted,
    QueueMessage,
)
from hybrid_router.lambda_exec.config import LambdaExecutorConfig

QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/results"


def client(service: str):
    session = boto3.session.Session(
        aws_access_key_id="AKIATEST", aws_secret_access_key="test", region_name="us-east-1"
    )
    return session.client(service)


@pytest.fixture
def lambda_stub():
    lambda_client = client("lambda")
    with Stubber(lambda_client) as stubber:
        yield lambda_client, stubber
        stubber.assert_no_pending_responses()


# -- answers become typed results ----------------------------------------------------------------------------


def test_describe_function_reads_timeout_and_memory(lambda_stub):
    lambda_client, stubber = lambda_stub
    stubber.add_response(
        "get_function",
        {"Configuration": {"FunctionName": "fn", "Timeout": 120, "MemorySize": 1024}},
        {"FunctionName": "fn", "Qualifier": "live"},
    )
    assert aws.describe_function(lambda_client, "fn", "live") == FunctionSettings(
        timeout_s=120, memory_mb=1024
    )


def test_event_invoke_settings_and_reserved_concurrency(lambda_stub):
    lambda_client, stubber = lambda_stub
    stubber.add_response(
        "get_function_event_invoke_config",
        {"MaximumRetryAttempts": 2, "MaximumEventAgeInSeconds": 300},
        {"FunctionName": "fn"},
    )
    stubber.add_response(
        "get_function_concurrency", {"ReservedConcurrentExecutions": 7}, {"FunctionName": "fn"}
    )
    stubber.add_response("get_function_concurrency", {}, {"FunctionName": "fn"})
    assert aws.event_invoke_settings(lambda_client, "fn") == EventInvokeSettings(2, 300)
    assert aws.reserved_concurrency(lambda_client, "fn") == 7
    assert aws.reserved_concurrency(lambda_client, "fn") is None  # none reserved


def test_accepted_invoke_carries_the_request_id(lambda_stub):
    lambda_client, stubber = lambda_stub
    stubber.add_response(
        "invoke",
        {"StatusCode": 202, "ResponseMetadata": {"RequestId": "req-1", "HTTPStatusCode": 202}},
        {"FunctionName": "fn", "InvocationType": "Event", "Payload": b"{}"},
    )
    assert aws.invoke_async(lambda_client, "fn", "", "{}") == InvokeAccepted("req-1")


def test_receive_parses_messages_and_batch_calls_report_failures():
    sqs = client("sqs")
    with Stubber(sqs) as stubber:
        stubber.add_response(
            "receive_message",
            {
                "Messages": [
                    {
                        "MessageId": "m1",
                        "ReceiptHandle": "rh-1",
                        "Body": "body",
                        "Attributes": {"ApproximateReceiveCount": "3"},
                        "MessageAttributes": {"ErrorCode": {"DataType": "String", "StringValue": "429"}},
                    }
                ]
            },
        )
        handles = [f"rh-{i}" for i in range(12)]
        stubber.add_response(
            "delete_message_batch",
            {
                "Successful": [{"Id": str(i)} for i in range(9)],
                "Failed": [
                    {"Id": "9", "SenderFault": True, "Code": "ReceiptHandleIsInvalid", "Message": "expired"}
                ],
            },
            {
                "QueueUrl": QUEUE,
                "Entries": [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles[:10])],
            },
        )
        stubber.add_response(
            "delete_message_batch",
            {"Successful": [{"Id": "0"}, {"Id": "1"}], "Failed": []},
            {
                "QueueUrl": QUEUE,
                "Entries": [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles[10:])],
            },
        )
        messages = aws.receive_messages(sqs, QUEUE, wait_seconds=1, visibility_timeout=120)
        failures = aws.delete_messages(sqs, QUEUE, handles)  # SQS takes at most ten per call
        stubber.assert_no_pending_responses()
    assert messages == [QueueMessage("m1", "rh-1", "body", 3, {"ErrorCode": "429"})]
    assert failures == ["9: ReceiptHandleIsInvalid expired"]


def test_log_messages_mentioning_a_request():
    logs = client("logs")
    with Stubber(logs) as stubber:
        stubber.add_response(
            "filter_log_events",
            {"events": [{"message": "START RequestId: req-1\n"}, {"message": "END RequestId: req-1"}]},
            {"logGroupName": "/aws/lambda/fn", "filterPattern": '"req-1"', "limit": 10},
        )
        lines = aws.filter_log_messages(logs, "/aws/lambda/fn", "req-1", limit=10)
    assert lines == ["START RequestId: req-1", "END RequestId: req-1"]


# -- errors become AwsError / AwsCallError -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("TooManyRequestsException", 429, AwsErrorKind.THROTTLED),
        ("ThrottlingException", 400, AwsErrorKind.THROTTLED),
        ("ServiceException", 500, AwsErrorKind.RETRYABLE),
        ("ResourceNotReadyException", 502, AwsErrorKind.RETRYABLE),
        ("ResourceNotFoundException", 404, AwsErrorKind.REJECTED),
        ("RequestTooLargeException", 413, AwsErrorKind.REJECTED),
        ("ResourceConflictException", 409, AwsErrorKind.REJECTED),
    ],
)
def test_invoke_errors_are_returned_classified(lambda_stub, code, status, kind):
    lambda_client, stubber = lambda_stub
    stubber.add_client_error(
        "invoke", service_error_code=code, service_message="why", http_status_code=status
    )
    assert aws.invoke_async(lambda_client, "fn", "", "{}") == AwsError(kind, code, "why")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ExpiredTokenException", 403),
        ("ExpiredToken", 400),
        ("UnrecognizedClientException", 403),
        ("InvalidSignatureException", 403),
        ("AccessDeniedException", 403),
    ],
)
def test_a_credentials_refusal_says_so(lambda_stub, code, status):
    # Refused before Lambda looked at the event: certainly not accepted, and credentials may refresh.
    lambda_client, stubber = lambda_stub
    stubber.add_client_error(
        "invoke", service_error_code=code, service_message="not allowed", http_status_code=status
    )
    error = aws.invoke_async(lambda_client, "fn", "", "{}")
    assert error == AwsError(AwsErrorKind.CREDENTIALS, code, "AWS credentials or permissions: not allowed")


@pytest.mark.parametrize(
    "exc",
    [
        NoCredentialsError(),
        PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
        CredentialRetrievalError(provider="container-role", error_msg="connection refused"),
        UnauthorizedSSOTokenError(),
    ],
)
def test_credentials_boto_cannot_find_are_a_credentials_refusal(exc):
    error = aws.classify_error(exc)
    assert (error.kind, error.code) == (AwsErrorKind.CREDENTIALS, type(exc).__name__)
    assert error.message.startswith("AWS credentials: ")


def test_an_exception_aws_did_not_answer_is_unexpected_not_a_refusal():
    # It may have been raised after the request went out: nothing proves the event was not accepted.
    error = aws.classify_error(RuntimeError("a bug"))
    assert error == AwsError(AwsErrorKind.UNEXPECTED, "RuntimeError", "a bug")


def test_calls_the_executor_cannot_go_on_without_raise_aws_call_error(lambda_stub):
    lambda_client, stubber = lambda_stub
    stubber.add_client_error(
        "get_function",
        service_error_code="ResourceNotFoundException",
        service_message="Function not found: fn",
        http_status_code=404,
    )
    stubber.add_client_error(
        "get_function_concurrency", service_error_code="TooManyRequestsException", http_status_code=429
    )
    with pytest.raises(AwsCallError) as missing:
        aws.describe_function(lambda_client, "fn")
    assert missing.value.error == AwsError(
        AwsErrorKind.REJECTED, "ResourceNotFoundException", "Function not found: fn"
    )
    assert str(missing.value) == "get_function failed: ResourceNotFoundException: Function not found: fn"
    with pytest.raises(AwsCallError) as throttled:
        aws.reserved_concurrency(lambda_client, "fn")
    assert throttled.value.error.kind is AwsErrorKind.THROTTLED


def test_a_missing_queue_raises_aws_call_error():
    sqs = client("sqs")
    with Stubber(sqs) as stubber:
        stubber.add_client_error(
            "get_queue_attributes",
            service_error_code="AWS.SimpleQueueService.NonExistentQueue",
            http_status_code=400,
        )
        with pytest.raises(AwsCallError) as info:
            aws.check_queue(sqs, QUEUE)
    assert info.value.error.code == "AWS.SimpleQueueService.NonExistentQueue"


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """Nowhere for boto3's default chain to find credentials: no variables, files or instance metadata."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Unroutable on purpose: the call must fail at signing, before any network.
    return boto3.session.Session().client(
        "lambda", region_name="us-east-1", endpoint_url="http://127.0.0.1:9"
    )


def test_no_credentials_is_a_credentials_refusal_not_a_crash(no_credentials):
    # NoCredentialsError has no ``.response``: reading it as a ClientError would crash the caller.
    error = aws.invoke_async(no_credentials, "fn", "", "{}")
    assert (error.kind, error.code) == (AwsErrorKind.CREDENTIALS, "NoCredentialsError")
    assert error.message.startswith("AWS credentials: ")
    with pytest.raises(AwsCallError) as info:
        aws.describe_function(no_credentials, "fn")
    assert info.value.error.code == "NoCredentialsError"


def test_an_unreachable_endpoint_is_retryable():
    lambda_client = boto3.session.Session(
        aws_access_key_id="AKIATEST", aws_secret_access_key="test", region_name="us-east-1"
    ).client(
        "lambda",
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=1),
    )
    error = aws.invoke_async(lambda_client, "fn", "", "{}")
    assert error.kind is AwsErrorKind.RETRYABLE and error.code == "EndpointConnectionError"


# -- every client comes from the same connection --------------------------------------------------------------


def test_logs_client_has_the_connections_credentials_like_lambda_and_sqs(monkeypatch):
    # The default chain has other credentials: the log client used to take those and skip aws_conn_id.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    monkeypatch.setenv(
        "AIRFLOW_CONN_LAMBDA_AWS",
        '{"conn_type": "aws", "login": "AKIACONNECTION", "password": "conn-secret"}',
    )
    config = LambdaExecutorConfig(
        function_name="fn",
        results_queue_url=QUEUE,
        signing_secret="s",
        aws_conn_id="lambda_aws",
        region_name="eu-west-1",
    )
    clients = aws.make_clients(config)
    logs = aws.make_logs_client(config)
    for made in (clients.lambda_, clients.sqs, logs):
        credentials = made._request_signer._credentials.get_frozen_credentials()
        assert (credentials.access_key, made.meta.region_name) == ("AKIACONNECTION", "eu-west-1")
    # Without aws_conn_id every client takes boto3's default chain, the log client included.
    plain = aws.make_logs_client(
        LambdaExecutorConfig(
            function_name="fn", results_queue_url=QUEUE, signing_secret="s", region_name="eu-west-1"
        )
    )
    assert plain._request_signer._credentials.get_frozen_credentials().access_key == "AKIAENVIRONMENT"

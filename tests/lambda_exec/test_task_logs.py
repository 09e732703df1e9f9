"""The Lambda run's log in the task log view, read from CloudWatch Logs with the executor's AWS connection."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.stub import Stubber

from hybrid_router.lambda_exec import aws
from hybrid_router.lambda_exec.executor import LambdaExecutor
from hybrid_router.lambda_exec.external_id import lambda_external_id

from .executor_support import SECRET

ARN = "arn:aws:lambda:eu-west-1:123456789012:function:airflow-task:live"
GROUP = "/aws/lambda/airflow-task"
SOURCE = f"AWS Lambda {ARN}: request req-42 (dispatch d1), CloudWatch Logs group {GROUP}"


@pytest.fixture
def logs_clients(monkeypatch) -> Callable[[Callable[[Stubber], None]], list[Any]]:
    """Make ``aws.make_logs_client`` attach a Stubber, scripted by the test, to each client it builds.

    The default chain and the connection ``lambda_aws`` have different keys, so a client shows which it used.
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "environment-secret")
    monkeypatch.setenv(
        "AIRFLOW_CONN_LAMBDA_AWS",
        '{"conn_type": "aws", "login": "AKIACONNECTION", "password": "conn-secret"}',
    )
    build = aws.make_logs_client

    def install(script: Callable[[Stubber], None]) -> list[Any]:
        made: list[Any] = []

        def stubbed(config):
            client = build(config)
            stubber = Stubber(client)
            script(stubber)
            stubber.activate()
            made.append(client)
            return client

        monkeypatch.setattr(aws, "make_logs_client", stubbed)
        return made

    return install


def make_executor() -> LambdaExecutor:
    return LambdaExecutor(
        function_name="airflow-task",
        results_queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/results",
        signing_secret=SECRET,
        region_name="eu-west-1",
        aws_conn_id="lambda_aws",
    )


def ti() -> SimpleNamespace:
    return SimpleNamespace(external_executor_id=lambda_external_id(ARN, "req-42", "d1"))


def test_cloudwatch_lines_are_read_with_the_connections_credentials(logs_clients):
    def script(stubber: Stubber) -> None:
        for _ in range(2):
            stubber.add_response(
                "filter_log_events",
                {"events": [{"message": "START RequestId: req-42\n"}, {"message": "token eyJa.eyJb.c\n"}]},
                {"logGroupName": GROUP, "filterPattern": '"req-42"', "limit": 1000},
            )

    made = logs_clients(script)
    executor = make_executor()  # never started, as on the API server
    for _ in range(2):
        assert executor.get_task_log(ti(), 1) == (
            [SOURCE],
            ["START RequestId: req-42", "token <token>"],
        )
    assert len(made) == 1  # one client for every view
    credentials = made[0]._request_signer._credentials.get_frozen_credentials()
    assert (credentials.access_key, made[0].meta.region_name) == ("AKIACONNECTION", "eu-west-1")


def test_a_refused_log_read_becomes_a_line_not_an_error(logs_clients):
    logs_clients(
        lambda stubber: stubber.add_client_error(
            "filter_log_events",
            service_error_code="AccessDeniedException",
            service_message="no logs:FilterLogEvents",
            http_status_code=400,
        )
    )
    assert make_executor().get_task_log(ti(), 1) == (
        [SOURCE],
        [
            "(the Lambda log could not be read: filter_log_events failed: AccessDeniedException: "
            "AWS credentials or permissions: no logs:FilterLogEvents)"
        ],
    )


def test_no_credentials_anywhere_becomes_a_line_not_an_error(monkeypatch, tmp_path):
    # No connection (the provider's hook then uses boto3's default chain) and nothing in that chain either.
    monkeypatch.delenv("AIRFLOW_CONN_LAMBDA_AWS", raising=False)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert make_executor().get_task_log(ti(), 1) == (
        [SOURCE],
        [
            "(the Lambda log could not be read: filter_log_events failed: NoCredentialsError: "
            "AWS credentials: Unable to locate credentials)"
        ],
    )

"""The Lambda executor's ``external_executor_id``: ``lambda:<function>:<request id>:<dispatch id>``.

No Airflow import, so the demo and other tools read it without loading Airflow's configuration.
"""

from __future__ import annotations

from typing import NamedTuple

PREFIX = "lambda:"


class LambdaRunId(NamedTuple):
    function_name: str
    request_id: str  # "" before Lambda accepted the event
    dispatch_id: str


def lambda_external_id(function_name: str, request_id: str, dispatch_id: str) -> str:
    """The ``external_executor_id`` the scheduler stores for a task run by the Lambda executor."""
    return f"{PREFIX}{function_name}:{request_id or '-'}:{dispatch_id}"


def parse_lambda_external_id(value: str | None) -> LambdaRunId | None:
    """The parts of a Lambda external id, or None if ``value`` is not one.

    The function name may be an ARN (with colons), so the id is split from the right.
    """
    if not value or not value.startswith(PREFIX):
        return None
    parts = value[len(PREFIX) :].rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        return None
    function_name, request_id, dispatch_id = parts
    return LambdaRunId(function_name, "" if request_id == "-" else request_id, dispatch_id)

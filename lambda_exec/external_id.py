"""The Lambda executor's ``external_executor_id``: ``lambda:<function>:<request id>:<dispatch id>[+<run id>]``.

The run id names the delivered copy of the event that claimed the task (``ResultMessage.run_id``); ids written
before runs were named (no ``+<run id>``) still parse, with an empty run id. No Airflow import, so the demo and
other tools read it without loading Airflow's configuration.
"""

from __future__ import annotations

from typing import NamedTuple

PREFIX = "lambda:"
RUN_MARK = "+"


class LambdaRunId(NamedTuple):
    function_name: str
    request_id: str  # "" before Lambda accepted the event
    dispatch_id: str
    run_id: str = ""  # "" until a run claimed the task, and in ids written before runs were named


def lambda_external_id(function_name: str, request_id: str, dispatch_id: str, run_id: str = "") -> str:
    """The ``external_executor_id`` the scheduler stores for a task run by the Lambda executor."""
    tail = f"{RUN_MARK}{run_id}" if run_id else ""
    return f"{PREFIX}{function_name}:{request_id or '-'}:{dispatch_id}{tail}"


def parse_lambda_external_id(value: str | None) -> LambdaRunId | None:
    """The parts of a Lambda external id, or None if ``value`` is not one.

    The function name may be an ARN (with colons), so the id is split from the right.
    """
    if not value or not value.startswith(PREFIX):
        return None
    parts = value[len(PREFIX) :].rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        return None
    function_name, request_id, last = parts
    dispatch_id, _, run_id = last.partition(RUN_MARK)
    if not dispatch_id:
        return None
    return LambdaRunId(function_name, "" if request_id == "-" else request_id, dispatch_id, run_id)

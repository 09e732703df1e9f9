"""The Lambda run's own log, shown beside the task's Airflow log in the task log view.

The API server asks an executor it never started, so this needs only the task's external id and the
configuration, and never raises: a log that cannot be read becomes a line saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_router.lambda_exec import aws, protocol
from hybrid_router.lambda_exec.config import LambdaConfigError
from hybrid_router.lambda_exec.external_id import parse_lambda_external_id

if TYPE_CHECKING:
    from hybrid_router.lambda_exec.config import LambdaExecutorConfig

CLOUDWATCH_MAX_EVENTS = 1000
LOCAL_MAX_LINES = 5000


class RunLogReader:
    """Reads a run's lines from the local service's log files (``local_log_dir``) or from CloudWatch Logs."""

    def __init__(self, load_config: Callable[[], LambdaExecutorConfig]):
        self._load_config = load_config
        self._logs_client: Any = None  # made on first use, with the credentials of aws_conn_id

    def read(self, external_id: str | None) -> tuple[list[str], list[str]]:
        """``(sources, lines)`` for ``BaseExecutor.get_task_log``; empty for a task this executor never ran."""
        parsed = parse_lambda_external_id(external_id)
        if parsed is None:
            return [], []
        function_name, request_id, dispatch_id = parsed.function_name, parsed.request_id, parsed.dispatch_id
        short_name = function_name.rsplit(":function:", 1)[-1].split(":", 1)[0]
        try:
            config = self._load_config()
        except LambdaConfigError as exc:
            return [f"AWS Lambda {function_name}: request {request_id or '?'}"], [f"({exc})"]
        if config.local_log_dir:
            where = f"local Lambda log folder {config.local_log_dir}/{short_name}"
        else:
            where = f"CloudWatch Logs group /aws/lambda/{short_name}"
        sources = [
            f"AWS Lambda {function_name}: request {request_id or '?'} (dispatch {dispatch_id}), {where}"
        ]
        if not request_id:
            return sources, []
        try:
            if config.local_log_dir:
                lines = local_invocation_log(Path(config.local_log_dir) / short_name, request_id)
            elif config.lambda_endpoint_url:
                return sources, []  # a non-AWS endpoint without a log folder: nothing more to read
            else:
                lines = self._cloudwatch_lines(config, f"/aws/lambda/{short_name}", request_id)
        except Exception as exc:  # the log view must render whatever went wrong here
            return sources, [f"(the Lambda log could not be read: {protocol.scrub(str(exc), 300)})"]
        return sources, lines

    def _cloudwatch_lines(self, config: LambdaExecutorConfig, group: str, request_id: str) -> list[str]:
        if self._logs_client is None:
            self._logs_client = aws.make_logs_client(config)
        messages = aws.filter_log_messages(self._logs_client, group, request_id, limit=CLOUDWATCH_MAX_EVENTS)
        return [protocol.scrub(message) for message in messages]


def local_invocation_log(folder: Path, request_id: str, max_lines: int = LOCAL_MAX_LINES) -> list[str]:
    """One invocation's lines from the local service's log streams (``START RequestId`` to ``REPORT``)."""
    start_marker = f"START RequestId: {request_id}"
    end_marker = f"REPORT RequestId: {request_id}"
    for stream in sorted(folder.glob("*.log")):
        lines: list[str] = []
        with stream.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not lines and not line.startswith(start_marker):
                    continue
                lines.append(protocol.scrub(line.rstrip("\n")))
                if line.startswith(end_marker) or len(lines) >= max_lines:
                    return lines
        if lines:
            return lines  # the run is still going: what it wrote so far
    return []

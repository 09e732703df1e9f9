"""The ``[lambda_executor]`` settings that point the LambdaExecutor at the local Lambda service and moto's SQS.

One builder for the demo, the Lambda end-to-end tests and the fallback benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from devtools.devstack import FAKE_AWS_ENV


def local_lambda_settings(
    *,
    function_name: str,
    results_queue_url: str,
    dead_letter_queue_url: str,
    signing_secret: str,
    lambda_endpoint_url: str,
    sqs_endpoint_url: str,
    local_log_dir: Path | str,
) -> dict[str, Any]:
    """``[lambda_executor]`` settings pointing the LambdaExecutor at the local Lambda service and moto's SQS."""
    return {
        "function_name": function_name,
        "results_queue_url": results_queue_url,
        "dead_letter_queue_url": dead_letter_queue_url,
        "signing_secret": signing_secret,
        "region_name": FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
        "lambda_endpoint_url": lambda_endpoint_url,
        "sqs_endpoint_url": sqs_endpoint_url,
        "aws_conn_id": "",  # credentials come from the environment; moto and the local service accept any
        "local_log_dir": str(local_log_dir),
    }

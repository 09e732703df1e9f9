"""The ``[lambda_executor]`` settings that point the LambdaExecutor at the local Lambda service and moto's SQS.

One builder for the demo, the Lambda end-to-end tests and the fallback benchmark, and the whole stack for the
end-to-end tests and the benchmark that need no more than one function.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.devstack import FAKE_AWS_ENV, LOOPBACK, AirflowStack, MotoServer, free_port
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService


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


@dataclass
class LambdaStack:
    """A real Airflow whose Lambda executor talks to a local Lambda service and moto's SQS, all on loopback."""

    airflow: AirflowStack
    service: LocalLambdaService
    moto: MotoServer
    results_queue_url: str
    dead_letter_queue_url: str
    log_dir: Path


@contextmanager
def airflow_with_local_lambda(
    root: Path,
    dags: Path,
    *,
    executor: str,
    function: FunctionConfig,
    secret: str,
    config: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[LambdaStack]:
    """Start moto's SQS (a results queue and a DLQ), the local Lambda service with ``function`` (its DLQ set
    here) and Airflow with ``executor`` and ``[lambda_executor]`` pointing at both; stop everything after."""
    log_dir = root / "lambda-logs"
    lambda_port = free_port()
    with MotoServer(log_dir=root) as moto:
        results, dlq = moto.create_queue("results"), moto.create_queue("dlq")
        settings = local_lambda_settings(
            function_name=function.name,
            results_queue_url=results,
            dead_letter_queue_url=dlq,
            signing_secret=secret,
            lambda_endpoint_url=f"http://{LOOPBACK}:{lambda_port}",
            sqs_endpoint_url=moto.url,
            local_log_dir=log_dir,
        )
        airflow = AirflowStack(
            home=root / "airflow",
            dags_folder=dags,
            executor=executor,
            config={**(config or {}), "lambda_executor": settings},
        )
        service_env = {**airflow.env, **FAKE_AWS_ENV, "AWS_ENDPOINT_URL_SQS": moto.url}
        with (
            LocalLambdaService(
                functions=[function.replace(dead_letter_queue_url=dlq)],
                env=service_env,
                sqs_endpoint_url=moto.url,
                port=lambda_port,
                log_dir=log_dir,
            ) as service,
            airflow,
        ):
            yield LambdaStack(airflow, service, moto, results, dlq, log_dir)

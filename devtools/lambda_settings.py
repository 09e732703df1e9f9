"""The ``[lambda_executor]`` settings that point the LambdaExecutor at the local Lambda service and moto's SQS.

One builder for the demo, the Lambda end-to-end tests and the fallback benchmark, and the whole stack for the
end-to-end tests and the benchmark that need no more than one function.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.devstack import FAKE_AWS_ENV, LOOPBACK, AirflowStack, MotoServer, free_port
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService
from hybrid_router.lambda_exec.local.sandbox import Ending


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
    scheduler_env: Mapping[str, str] | None = None,
    database_url: str | None = None,
    schedulers: int = 1,
    env: Mapping[str, str] | None = None,
    more_functions: Sequence[FunctionConfig] = (),
) -> Iterator[LambdaStack]:
    """Start moto's SQS (a results queue and a DLQ), the local Lambda service with ``function`` (its DLQ set
    here) and Airflow with ``executor`` and ``[lambda_executor]`` pointing at both; stop everything after.
    ``scheduler_env`` reaches the scheduler only (such as ``devtools.aws_faults.process_env()``);
    ``database_url`` and ``schedulers``: see ``AirflowStack`` (one scheduler on SQLite in ``root`` by default);
    ``env`` reaches every Airflow process and the local Lambda service with its sandboxes (such as
    ``devtools.latency.AWS_LIKE.process_env()``); ``more_functions`` are hosted beside ``function``, with the same
    DLQ (a policy's Lambda child names one with ``options: {function_name: ...}``; ``[lambda_executor]`` names
    ``function``)."""
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
            scheduler_env=scheduler_env,
            database_url=database_url,
            schedulers=schedulers,
            env=env,
        )
        service_env = {**airflow.env, **FAKE_AWS_ENV, "AWS_ENDPOINT_URL_SQS": moto.url}
        with (
            LocalLambdaService(
                functions=[f.replace(dead_letter_queue_url=dlq) for f in (function, *more_functions)],
                env=service_env,
                sqs_endpoint_url=moto.url,
                port=lambda_port,
                log_dir=log_dir,
            ) as service,
            airflow,
        ):
            yield LambdaStack(airflow, service, moto, results, dlq, log_dir)


def all_deliveries_ended(service: LocalLambdaService, function_name: str) -> bool:
    """Every accepted event and every duplicate delivery of ``function_name`` has come to its end (a copy
    delivered once its first run ended too, an event that aged out unrun too), and nothing waits or runs."""
    stats = service.stats()
    counts = stats["functions"][function_name]
    ended = sum(counts.get(ending.value, 0) for ending in Ending) + counts.get("expired", 0)
    expected = counts["async_accepted"] + stats["faults"]["duplicates_delivered"]
    return counts["queued"] == 0 and counts["in_flight"] == 0 and ended >= expected

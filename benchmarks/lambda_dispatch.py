"""Dispatch throughput: this project's LambdaExecutor against the Amazon provider's AwsLambdaExecutor.

Both executors are driven the same way, with no scheduler and no database: N no-op tasks are queued at once,
then ``heartbeat()`` runs every ``--heartbeat`` seconds (as a scheduler loop would) until every task has a final
event. Both use the same local Lambda service and moto's SQS server; each function runs a no-op handler that
answers in its executor's own format (``lambda_noop_handlers.py``). Both get ``parallelism = N``.

AWS API calls are counted on the executor's side only, with a ``before-call.*.*`` hook on every botocore client
created while the executor runs (the provider rebuilds its clients after a failed health check), from the
executor's construction to its ``end()``.

    python benchmarks/lambda_dispatch.py [--tasks 200] [--heartbeat 0.5]

The last line is JSON with ``speedup_vs_provider`` (provider wall time / ours) and ``api_calls_per_task`` (ours).
Targets: speedup >= 10, calls per task <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SECRET = "benchmark-secret"
FINAL_STATES = ("success", "failed")


# -- counting AWS calls ------------------------------------------------------------------------------------------


@contextmanager
def count_api_calls() -> Iterator[Counter[str]]:
    """Count every API call of every botocore client created inside the block."""
    import botocore.session

    calls: Counter[str] = Counter()
    original = botocore.session.Session.create_client

    def create_client(self: Any, *args: Any, **kwargs: Any) -> Any:
        client = original(self, *args, **kwargs)
        service = client.meta.service_model.service_name
        client.meta.events.register(
            "before-call.*.*", lambda model, **_: calls.update([f"{service}.{model.name}"])
        )
        return client

    botocore.session.Session.create_client = create_client  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        botocore.session.Session.create_client = original  # type: ignore[method-assign]


# -- workloads -----------------------------------------------------------------------------------------------------


def make_workloads(count: int, dag_id: str) -> list[Any]:
    from airflow.executors.workloads import BundleInfo, ExecuteTask
    from airflow.executors.workloads.task import TaskInstanceDTO

    run_id = f"bench__{uuid.uuid4().hex[:8]}"
    workloads = []
    for i in range(count):
        ti = TaskInstanceDTO(
            id=uuid.uuid4(),
            dag_id=dag_id,
            task_id=f"noop_{i}",
            run_id=run_id,
            try_number=1,
            map_index=-1,
            dag_version_id=uuid.uuid4(),
            pool_slots=1,
            priority_weight=1,
            queue="default",
        )
        workloads.append(
            ExecuteTask(
                ti=ti,
                dag_rel_path=f"{dag_id}.py",
                token="",
                log_path=f"dag_id={dag_id}/run_id={run_id}/task_id=noop_{i}/attempt=1.log",
                bundle_info=BundleInfo(name="dags-folder"),
            )
        )
    return workloads


# -- one measured run -----------------------------------------------------------------------------------------------


def drive(
    build: Callable[[], Any], tasks: int, heartbeat_s: float, dag_id: str, timeout_s: float
) -> dict[str, Any]:
    with count_api_calls() as calls:
        executor = build()
        executor.start()
        workloads = make_workloads(tasks, dag_id)
        begin = time.perf_counter()
        for workload in workloads:
            executor.queue_workload(workload, session=None)
        finished: dict[Any, str] = {}
        heartbeats = 0
        while len(finished) < tasks:
            tick = time.perf_counter()
            if tick - begin > timeout_s:
                break
            executor.heartbeat()
            heartbeats += 1
            for key, (state, _) in executor.get_event_buffer().items():
                if str(state) in FINAL_STATES:
                    finished[key] = str(state)
            time.sleep(max(0.0, heartbeat_s - (time.perf_counter() - tick)))
        wall = time.perf_counter() - begin
        executor.end()
    total_calls = sum(calls.values())
    return {
        "tasks": tasks,
        "finished": len(finished),
        "succeeded": sum(1 for state in finished.values() if state == "success"),
        "wall_s": round(wall, 2),
        "tasks_per_s": round(len(finished) / wall, 1),
        "heartbeats": heartbeats,
        "api_calls": total_calls,
        "api_calls_per_task": round(total_calls / tasks, 3),
        "calls_by_operation": dict(sorted(calls.items())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--heartbeat", type=float, default=0.5, help="seconds between heartbeats")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a run after this long")
    parser.add_argument(
        "--lambda-concurrency",
        type=int,
        default=32,
        help="the local service's account concurrency (both functions)",
    )
    args = parser.parse_args(argv)

    from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService

    from hybrid_router.devstack import FAKE_AWS_ENV, MotoServer

    os.environ.update(FAKE_AWS_ENV)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    workdir = Path(tempfile.mkdtemp(prefix="lambda-dispatch-"))
    with MotoServer(log_dir=workdir) as moto:
        ours_results, ours_dlq = moto.create_queue("ours-results"), moto.create_queue("ours-dlq")
        theirs_results, theirs_dlq = moto.create_queue("provider-results"), moto.create_queue("provider-dlq")
        common = {"code_path": str(HERE), "memory_mb": 256, "timeout_s": 30, "maximum_retry_attempts": 0}
        functions = [
            FunctionConfig(
                name="bench-hybrid",
                handler="lambda_noop_handlers.hybrid_noop",
                dead_letter_queue_url=ours_dlq,
                environment={"HYBRID_ROUTER_SIGNING_SECRET": SECRET},
                **common,
            ),
            FunctionConfig(
                name="bench-provider",
                handler="lambda_noop_handlers.provider_noop",
                dead_letter_queue_url=theirs_dlq,
                environment={"QUEUE_URL": theirs_results},
                **common,
            ),
        ]
        service_env = {**os.environ, **FAKE_AWS_ENV, "AWS_ENDPOINT_URL_SQS": moto.url}
        with LocalLambdaService(
            functions=functions,
            env=service_env,
            sqs_endpoint_url=moto.url,
            log_dir=workdir / "lambda-logs",
            log_level="WARNING",
        ) as service:
            from hybrid_router.lambda_exec.executor import LambdaExecutor

            def ours() -> Any:
                return LambdaExecutor(
                    parallelism=args.tasks,
                    function_name="bench-hybrid",
                    results_queue_url=ours_results,
                    dead_letter_queue_url=ours_dlq,
                    signing_secret=SECRET,
                    lambda_endpoint_url=service.url,
                    sqs_endpoint_url=moto.url,
                    region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
                    aws_conn_id="",
                )

            def provider() -> Any:
                # The provider reads [aws_lambda_executor] and reaches local endpoints through its AWS hook.
                os.environ.update(
                    {
                        "AIRFLOW__AWS_LAMBDA_EXECUTOR__FUNCTION_NAME": "bench-provider",
                        "AIRFLOW__AWS_LAMBDA_EXECUTOR__QUEUE_URL": theirs_results,
                        "AIRFLOW__AWS_LAMBDA_EXECUTOR__DEAD_LETTER_QUEUE_URL": theirs_dlq,
                        "AIRFLOW__AWS_LAMBDA_EXECUTOR__REGION_NAME": FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
                        "AIRFLOW__AWS_LAMBDA_EXECUTOR__CHECK_HEALTH_ON_STARTUP": "True",
                        "AIRFLOW_CONN_AWS_DEFAULT": "aws://",
                        "AWS_ENDPOINT_URL_LAMBDA": service.url,
                        "AWS_ENDPOINT_URL_SQS": moto.url,
                    }
                )
                from airflow.providers.amazon.aws.executors.aws_lambda.lambda_executor import (
                    AwsLambdaExecutor,
                )

                return AwsLambdaExecutor(parallelism=args.tasks)

            before = service.stats()["functions"]["bench-hybrid"].get("invocations", 0)
            results = {"ours": drive(ours, args.tasks, args.heartbeat, "bench_ours", args.timeout)}
            ran = service.stats()["functions"]["bench-hybrid"].get("invocations", 0) - before
            service_rate = round(ran / results["ours"]["wall_s"], 1)
            results["provider"] = drive(provider, args.tasks, args.heartbeat, "bench_provider", args.timeout)

    for name, label in (
        ("ours", "LambdaExecutor (this project)"),
        ("provider", "AwsLambdaExecutor (provider)"),
    ):
        r = results[name]
        print(
            f"{label:32s} {r['finished']}/{r['tasks']} final ({r['succeeded']} success) in {r['wall_s']:6.2f} s"
            f" = {r['tasks_per_s']:6.1f} tasks/s over {r['heartbeats']} heartbeats;"
            f" {r['api_calls']} AWS calls = {r['api_calls_per_task']:.2f}/task"
        )
        print(f"{'':32s} calls: {r['calls_by_operation']}")
    print(
        f"local Lambda service: {service_rate} no-op invocations/s during our run (includes result sending)"
    )
    ours_r, theirs_r = results["ours"], results["provider"]
    complete = ours_r["finished"] == args.tasks and theirs_r["finished"] == args.tasks
    speedup = round(theirs_r["wall_s"] / ours_r["wall_s"], 2) if complete else None
    print(
        json.dumps(
            {
                "speedup_vs_provider": speedup,
                "api_calls_per_task": ours_r["api_calls_per_task"],
                "provider_api_calls_per_task": theirs_r["api_calls_per_task"],
                "ours_tasks_per_s": ours_r["tasks_per_s"],
                "provider_tasks_per_s": theirs_r["tasks_per_s"],
                "local_service_noop_invocations_per_s": service_rate,
                "tasks": args.tasks,
                "heartbeat_s": args.heartbeat,
            }
        )
    )
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())

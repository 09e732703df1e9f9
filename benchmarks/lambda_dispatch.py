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


# -- an instant Lambda endpoint -------------------------------------------------------------------------------------


class InstantLambda:
    """A Lambda endpoint with no run time: answers 202 at once and writes each function's no-op results to SQS.

    It takes the local service's place to measure what the executors themselves can do once Lambda is not the
    bottleneck (the local service runs each event in a sandbox on the same two cores). Its SQS client is created
    before the counting starts: only executor calls are counted.
    """

    def __init__(self, sqs: Any, results_urls: dict[str, str]):
        import http.server
        import queue
        import threading

        self._sqs = sqs
        self._results_urls = results_urls
        self._outbox: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.split("/functions/")[1].split("/")[0]
                if self.path.endswith("/concurrency") or self.path.endswith("/event-invoke-config"):
                    self._reply(200, {"MaximumRetryAttempts": 0} if "event-invoke" in self.path else {})
                else:
                    self._reply(200, {"Configuration": {"FunctionName": name, "Timeout": 30}})

            def do_POST(self) -> None:
                name = self.path.split("/functions/")[1].split("/")[0]
                payload = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                owner.accept(name, payload)
                self._reply(202, None)

            def _reply(self, status: int, body: Any) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._threads = [
            threading.Thread(target=self._server.serve_forever, daemon=True),
            threading.Thread(target=self._send_loop, daemon=True),
        ]

    def __enter__(self) -> InstantLambda:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._outbox.put(None)
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)

    def accept(self, function_name: str, payload: str) -> None:
        from hybrid_router.lambda_exec import protocol
        from hybrid_router.lambda_exec.protocol import Outcome, Phase, ResultMessage

        url = self._results_urls[function_name]
        if function_name == "bench-provider":
            task_key = json.loads(payload)["task_key"]
            self._outbox.put((url, json.dumps({"task_key": task_key, "return_code": 0})))
            return
        event = protocol.open_event(payload, SECRET.encode())
        now = time.time()
        for phase, outcome in ((Phase.STARTED, None), (Phase.FINISHED, Outcome.SUCCESS)):
            result = ResultMessage(
                phase=phase,
                dispatch_id=event.dispatch_id,
                task=event.task,
                sent_at=now,
                started_at=now,
                outcome=outcome,
                return_code=0 if outcome else None,
            )
            self._outbox.put((url, protocol.seal_result(result, SECRET.encode())))

    def _send_loop(self) -> None:
        """Send results in batches of ten, as fast as SQS takes them."""
        import queue

        while True:
            item = self._outbox.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 10:
                try:
                    nxt = self._outbox.get(timeout=0.005)
                except queue.Empty:
                    break
                if nxt is None:
                    self._outbox.put(None)
                    break
                batch.append(nxt)
            by_queue: dict[str, list[str]] = {}
            for url, body in batch:
                by_queue.setdefault(url, []).append(body)
            for url, bodies in by_queue.items():
                self._sqs.send_message_batch(
                    QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies)]
                )


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
        longest_heartbeat = 0.0
        while len(finished) < tasks:
            tick = time.perf_counter()
            if tick - begin > timeout_s:
                break
            executor.heartbeat()
            heartbeats += 1
            longest_heartbeat = max(longest_heartbeat, time.perf_counter() - tick)
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
        # How long the scheduler loop would be held by one heartbeat of this executor.
        "longest_heartbeat_s": round(longest_heartbeat, 3),
        "api_calls": total_calls,
        "api_calls_per_task": round(total_calls / tasks, 3),
        "calls_by_operation": dict(sorted(calls.items())),
    }


def compare(
    lambda_url: str, moto_url: str, queues: dict[str, str], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Run N tasks through our executor, then through the provider's, against the same endpoints."""
    from hybrid_router.lambda_exec.executor import LambdaExecutor

    from hybrid_router.devstack import FAKE_AWS_ENV

    def ours() -> Any:
        return LambdaExecutor(
            parallelism=args.tasks,
            function_name="bench-hybrid",
            results_queue_url=queues["ours-results"],
            dead_letter_queue_url=queues["ours-dlq"],
            signing_secret=SECRET,
            lambda_endpoint_url=lambda_url,
            sqs_endpoint_url=moto_url,
            region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
            aws_conn_id="",
        )

    def provider() -> Any:
        # The provider reads [aws_lambda_executor] and reaches local endpoints through its AWS hook.
        os.environ.update(
            {
                "AIRFLOW__AWS_LAMBDA_EXECUTOR__FUNCTION_NAME": "bench-provider",
                "AIRFLOW__AWS_LAMBDA_EXECUTOR__QUEUE_URL": queues["provider-results"],
                "AIRFLOW__AWS_LAMBDA_EXECUTOR__DEAD_LETTER_QUEUE_URL": queues["provider-dlq"],
                "AIRFLOW__AWS_LAMBDA_EXECUTOR__REGION_NAME": FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
                "AIRFLOW__AWS_LAMBDA_EXECUTOR__CHECK_HEALTH_ON_STARTUP": "True",
                "AIRFLOW_CONN_AWS_DEFAULT": "aws://",
                "AWS_ENDPOINT_URL_LAMBDA": lambda_url,
                "AWS_ENDPOINT_URL_SQS": moto_url,
            }
        )
        from airflow.providers.amazon.aws.executors.aws_lambda.lambda_executor import AwsLambdaExecutor

        return AwsLambdaExecutor(parallelism=args.tasks)

    return {
        "ours": drive(ours, args.tasks, args.heartbeat, "bench_ours", args.timeout),
        "provider": drive(provider, args.tasks, args.heartbeat, "bench_provider", args.timeout),
    }


def report(title: str, results: dict[str, dict[str, Any]]) -> float | None:
    print(f"== {title}")
    for name, label in (
        ("ours", "LambdaExecutor (this project)"),
        ("provider", "AwsLambdaExecutor (provider)"),
    ):
        r = results[name]
        print(
            f"{label:32s} {r['finished']}/{r['tasks']} final ({r['succeeded']} success) in {r['wall_s']:6.2f} s"
            f" = {r['tasks_per_s']:6.1f} tasks/s over {r['heartbeats']} heartbeats (longest"
            f" {r['longest_heartbeat_s']:.3f} s); {r['api_calls']} AWS calls = {r['api_calls_per_task']:.2f}/task"
        )
        print(f"{'':32s} calls: {r['calls_by_operation']}")
    ours, theirs = results["ours"], results["provider"]
    if ours["finished"] < ours["tasks"] or theirs["finished"] < theirs["tasks"]:
        return None
    return round(theirs["wall_s"] / ours["wall_s"], 2)


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

        def fresh_queues() -> dict[str, str]:
            tag = uuid.uuid4().hex[:6]
            names = ("ours-results", "ours-dlq", "provider-results", "provider-dlq")
            return {name: moto.create_queue(f"{name}-{tag}") for name in names}

        # 1. The local Lambda service: each no-op event runs in a warm sandbox on this machine.
        queues = fresh_queues()
        common = {"code_path": str(HERE), "memory_mb": 256, "timeout_s": 30, "maximum_retry_attempts": 0}
        functions = [
            FunctionConfig(
                name="bench-hybrid",
                handler="lambda_noop_handlers.hybrid_noop",
                dead_letter_queue_url=queues["ours-dlq"],
                environment={"HYBRID_ROUTER_SIGNING_SECRET": SECRET},
                **common,
            ),
            FunctionConfig(
                name="bench-provider",
                handler="lambda_noop_handlers.provider_noop",
                dead_letter_queue_url=queues["provider-dlq"],
                environment={"QUEUE_URL": queues["provider-results"]},
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
            account_concurrency=args.lambda_concurrency,
        ) as service:
            local = compare(service.url, moto.url, queues, args)
            invocations = service.stats()["functions"]["bench-hybrid"].get("invocations", 0)
        service_rate = round(invocations / local["ours"]["wall_s"], 1)

        # 2. An instant endpoint: what the executors themselves sustain once Lambda is not the bottleneck.
        queues = fresh_queues()
        results_urls = {"bench-hybrid": queues["ours-results"], "bench-provider": queues["provider-results"]}
        with InstantLambda(moto.client("sqs"), results_urls) as instant:
            fast = compare(instant.url, moto.url, queues, args)

    local_speedup = report(
        f"local Lambda service ({args.tasks} no-op tasks, heartbeat {args.heartbeat}s)", local
    )
    print(f"local Lambda service ran {service_rate} no-op invocations/s during our run (results sent to SQS)")
    instant_speedup = report("instant Lambda endpoint (executor-bound)", fast)
    print(
        json.dumps(
            {
                "speedup_vs_provider": local_speedup,
                "api_calls_per_task": local["ours"]["api_calls_per_task"],
                "provider_api_calls_per_task": local["provider"]["api_calls_per_task"],
                "ours_tasks_per_s": local["ours"]["tasks_per_s"],
                "provider_tasks_per_s": local["provider"]["tasks_per_s"],
                "local_service_noop_invocations_per_s": service_rate,
                "instant_endpoint_speedup_vs_provider": instant_speedup,
                "instant_endpoint_api_calls_per_task": fast["ours"]["api_calls_per_task"],
                "instant_endpoint_ours_tasks_per_s": fast["ours"]["tasks_per_s"],
                "instant_endpoint_provider_tasks_per_s": fast["provider"]["tasks_per_s"],
                "longest_heartbeat_s": {k: local[k]["longest_heartbeat_s"] for k in ("ours", "provider")},
                "tasks": args.tasks,
                "heartbeat_s": args.heartbeat,
            }
        )
    )
    return 0 if local_speedup is not None and instant_speedup is not None else 1


if __name__ == "__main__":
    sys.exit(main())

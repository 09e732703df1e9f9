"""Dispatch throughput: this project's LambdaExecutor against the Amazon provider's AwsLambdaExecutor.

Both executors are driven the same way, with no scheduler and no database: N no-op tasks are queued at once,
then ``heartbeat()`` runs every ``--heartbeat`` seconds (as a scheduler loop would) until every task has a final
event. Both use the same local Lambda service and moto's SQS server; each function runs a no-op handler that
answers in its executor's own format (``lambda_noop_handlers.py``). Both get ``parallelism = N``.

AWS API calls are counted on the executor's side only, with a ``before-call.*.*`` hook on every botocore client
created while the executor runs (the provider rebuilds its clients after a failed health check), from the
executor's construction to its ``end()``.

The local service's account concurrency defaults to this machine's CPU count (both functions share it): each
sandbox is a process on the same CPUs as moto and the executors, so more sandboxes only add cold starts (a boto3
import each) that compete with the runs; measured on 2 cores, 200 tasks took 4.5 s at 2, 5.0 s at 4, 6.5 s at 8,
8.2 s at 16 and 10 s at 32.

Two reference figures bound what any executor can reach here:
- the local service alone: warm no-op events (no SQS) per second, at the same concurrency
  (``local_lambda_rate.py``);
- moto's SQS alone: the SQS work of our executor's run without Lambda or executor (``--tasks`` messages, one
  per no-op task, sent one by one from as many processes as sandboxes, received and deleted in batches of ten
  by one reader); its time is a floor for our wall time, and provider wall time / floor the highest speedup
  this machine allows; the same with two messages per task (STARTED and FINISHED, as runs longer than the
  grace send) is shown for reference. moto's
  receive is the costly part: each message it returns re-reads the queue's attributes, which walks every message
  in the queue, so its cost grows with the queue's depth (messages received but not yet deleted included).

    python benchmarks/lambda_dispatch.py [--tasks 200] [--heartbeat 0.5] [--lambda-concurrency N]

The last line is JSON with ``speedup_vs_provider`` (provider wall time / ours) and ``api_calls_per_task`` (ours).
Targets: speedup >= 10, calls per task <= 1.5. Wall time runs to the end of the heartbeat interval in which
the last final state was reported, so it counts in whole heartbeats; ``to_last_final_s`` (and
``speedup_to_last_final``) stop when that heartbeat returned instead.

The hybrid no-op handler sends what the real handler sends for a run shorter than its STARTED grace
(``HYBRID_ROUTER_STARTED_GRACE_S``): FINISHED alone, one message per task; the instant endpoint does the same.
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
sys.path.insert(0, str(HERE.parent))  # devtools/ lives in the checkout, not the wheel
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
            protocol_version = "HTTP/1.1"  # keep-alive, as the local service: boto3 reuses its connections

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

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            # The default backlog (5) resets connections under a burst of invokes from an executor's thread pool.
            request_queue_size = 256

        self._server = Server(("127.0.0.1", 0), Handler)
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
        from hybrid_router.lambda_exec import handler, protocol
        from hybrid_router.lambda_exec.protocol import Outcome, Phase, ResultMessage

        url = self._results_urls[function_name]
        if function_name == "bench-provider":
            task_key = json.loads(payload)["task_key"]
            self._outbox.put((url, json.dumps({"task_key": task_key, "return_code": 0})))
            return
        event = protocol.read_event(payload)
        outbox = self._outbox
        key = event.result_signing_key()

        class Reporter:
            """The handler's ``ResultReporter``, writing to the outbox instead of SQS."""

            def send(self, phase: Phase, *, started_at: float, **fields: Any) -> None:
                result = ResultMessage(
                    phase=phase,
                    dispatch_id=event.dispatch_id,
                    task=event.task,
                    sent_at=time.time(),
                    started_at=started_at,
                    **fields,
                )
                outbox.put((url, protocol.seal_result(result, key)))

        # The real handler's message pattern for a run of no length: its STARTED grace decides.
        reporter = Reporter()
        started = time.time()
        notice = handler.StartedNotice(reporter, started, handler.started_grace_s())  # type: ignore[arg-type]
        notice.arm()
        notice.settle()
        reporter.send(Phase.FINISHED, started_at=started, outcome=Outcome.SUCCESS, return_code=0)

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


# -- reference figures ---------------------------------------------------------------------------------------------


def sqs_floor(moto_url: str, messages: int, senders: int) -> dict[str, Any]:
    """Time moto's SQS takes for ``messages`` results: sent one by one (as handlers send them) from ``senders``
    processes (as sandboxes are) while one reader receives and deletes them in batches of ten (as the executor's
    reader does). Client start-up is not timed."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    reader = _sqs_client(moto_url)
    url = reader.create_queue(QueueName=f"floor-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    ready, go = ctx.Barrier(senders + 1), ctx.Event()
    counts = [messages // senders + (1 if i < messages % senders else 0) for i in range(senders)]
    procs = [ctx.Process(target=_send_results, args=(moto_url, url, n, ready, go)) for n in counts]
    for proc in procs:
        proc.start()
    try:
        ready.wait(timeout=120)
        begin = time.perf_counter()
        go.set()
        received = 0
        while received < messages and time.perf_counter() - begin < 300:
            got = reader.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
                "Messages"
            )
            if not got:
                continue
            reader.delete_message_batch(
                QueueUrl=url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)],
            )
            received += len(got)
        wall = time.perf_counter() - begin
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return {"messages": received, "wall_s": round(wall, 2), "messages_per_s": round(received / wall, 1)}


def _send_results(moto_url: str, queue_url: str, count: int, ready: Any, go: Any) -> None:
    client = _sqs_client(moto_url)
    body = "x" * 600  # about the size of a signed result message
    ready.wait()
    go.wait()
    for _ in range(count):
        client.send_message(QueueUrl=queue_url, MessageBody=body)


def _sqs_client(url: str) -> Any:
    import boto3

    from devtools.devstack import FAKE_AWS_ENV

    return boto3.client("sqs", endpoint_url=url, region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"])


def service_alone_rate(concurrency: int, events: int) -> dict[str, Any]:
    """Warm no-op events per second of the local service alone (no SQS, no executor), at ``concurrency``."""
    sys.path.insert(0, str(HERE))
    from local_lambda_rate import run

    return run(events=events, concurrency=concurrency, clients=4, sync_calls=20)


# -- workloads -----------------------------------------------------------------------------------------------------


def make_workloads(count: int, dag_id: str) -> list[Any]:
    from devtools.workloads import make_workload

    run_id = f"bench__{uuid.uuid4().hex[:8]}"
    return [
        make_workload(
            f"noop_{i}",
            dag_id=dag_id,
            run_id=run_id,
            token="",
            # Airflow's own file name for the try, as the scheduler sets it (make_workload's default is none).
            log_path=f"dag_id={dag_id}/run_id={run_id}/task_id=noop_{i}/attempt=1.log",
        )
        for i in range(count)
    ]


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
        last_final_at = None
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
            if len(finished) == tasks:
                last_final_at = time.perf_counter()
            time.sleep(max(0.0, heartbeat_s - (time.perf_counter() - tick)))
        wall = time.perf_counter() - begin
        executor.end()
    total_calls = sum(calls.values())
    return {
        "tasks": tasks,
        "finished": len(finished),
        "succeeded": sum(1 for state in finished.values() if state == "success"),
        "wall_s": round(wall, 2),
        # When the heartbeat that reported the last final state returned (wall_s adds the idle wait after it).
        "to_last_final_s": None if last_final_at is None else round(last_final_at - begin, 2),
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
    from devtools.devstack import FAKE_AWS_ENV
    from hybrid_router.lambda_exec.executor import LambdaExecutor

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
    print(
        f"{'':32s} last final state reported after {ours['to_last_final_s']} s (ours) and"
        f" {theirs['to_last_final_s']} s (provider): {speedup_to_last_final(results)}x"
    )
    return round(theirs["wall_s"] / ours["wall_s"], 2)


def speedup_to_last_final(results: dict[str, dict[str, Any]]) -> float | None:
    """The speedup counted to the heartbeat that reported each executor's last final state."""
    ours, theirs = results["ours"]["to_last_final_s"], results["provider"]["to_last_final_s"]
    return round(theirs / ours, 2) if ours and theirs else None


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
        default=os.cpu_count() or 2,
        help="the local service's account concurrency (both functions; default: the CPU count)",
    )
    args = parser.parse_args(argv)

    from devtools.devstack import FAKE_AWS_ENV, MotoServer
    from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService

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
        # Invocations the service ran per second of our run: bounded by the run, not a capacity of the service.
        service_rate_in_run = round(invocations / local["ours"]["wall_s"], 1)
        floor = sqs_floor(moto.url, 2 * args.tasks, args.lambda_concurrency)
        # One message per task is what the handler sends for a no-op (FINISHED alone); two for longer runs.
        floor_one = sqs_floor(moto.url, args.tasks, args.lambda_concurrency)

        # 2. An instant endpoint: what the executors themselves sustain once Lambda is not the bottleneck.
        queues = fresh_queues()
        results_urls = {"bench-hybrid": queues["ours-results"], "bench-provider": queues["provider-results"]}
        with InstantLambda(moto.client("sqs"), results_urls) as instant:
            fast = compare(instant.url, moto.url, queues, args)

    alone = service_alone_rate(args.lambda_concurrency, events=max(args.tasks, 100))
    local_speedup = report(
        f"local Lambda service ({args.tasks} no-op tasks, heartbeat {args.heartbeat}s)", local
    )
    print(
        f"local Lambda service: {service_rate_in_run} invocations/s during our run (each sends 1 result to SQS);"
        f" alone (no SQS, warm, concurrency {args.lambda_concurrency}): {alone['noop_invocations_per_s']} no-op"
        f" invocations/s, cold start {alone['cold_start_ms']} ms"
    )
    floor_speedup = round(local["provider"]["wall_s"] / floor_one["wall_s"], 2)
    print(
        f"moto SQS alone: {floor_one['messages']} result messages sent one by one, received and deleted in"
        f" {floor_one['wall_s']} s = {floor_one['messages_per_s']} msg/s: a floor for our run (1 message per"
        f" no-op task), so at most {floor_speedup}x the provider's {local['provider']['wall_s']} s on this"
        f" machine; with two messages per task {floor['wall_s']} s, at most"
        f" {round(local['provider']['wall_s'] / floor['wall_s'], 2)}x"
    )
    instant_speedup = report("instant Lambda endpoint (executor-bound)", fast)
    print(
        json.dumps(
            {
                "speedup_vs_provider": local_speedup,
                "speedup_to_last_final": speedup_to_last_final(local),
                "to_last_final_s": {k: local[k]["to_last_final_s"] for k in ("ours", "provider")},
                "api_calls_per_task": local["ours"]["api_calls_per_task"],
                "provider_api_calls_per_task": local["provider"]["api_calls_per_task"],
                "ours_tasks_per_s": local["ours"]["tasks_per_s"],
                "provider_tasks_per_s": local["provider"]["tasks_per_s"],
                "local_service_noop_invocations_per_s": alone["noop_invocations_per_s"],
                "local_service_invocations_per_s_in_run": service_rate_in_run,
                "local_service_cold_start_ms": alone["cold_start_ms"],
                "moto_sqs_floor_one_message_per_task_s": floor_one["wall_s"],
                "moto_sqs_messages_per_s": floor_one["messages_per_s"],
                "max_speedup_allowed_by_moto_sqs": floor_speedup,
                "moto_sqs_floor_two_messages_per_task_s": floor["wall_s"],
                "lambda_concurrency": args.lambda_concurrency,
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

"""How many no-op invocations per second the local Lambda service runs, warm, on this machine.

    python benchmarks/local_lambda_rate.py [--events 500] [--concurrency 4] [--clients 4]

Measures, against a real service process (no SQS needed: the no-op handler reports nothing):
- the cold start (first synchronous invoke, runtime start-up and handler import included);
- sequential synchronous warm invokes (one client, one at a time): the round trip of one invocation;
- asynchronous no-op events sent by several client threads to a function with reserved concurrency
  ``--concurrency``, from the first invoke until the service has run them all.
The last line is JSON: {"noop_invocations_per_s": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService

NOOP_MODULE = """
def handler(event, context):
    return None
"""


def client_for(url: str) -> Any:
    return boto3.client(
        "lambda",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(retries={"mode": "standard", "max_attempts": 10}, max_pool_connections=32),
    )


def run(events: int, concurrency: int, clients: int, sync_calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="local-lambda-bench-") as work:
        code = Path(work) / "code"
        code.mkdir()
        (code / "noop_handler.py").write_text(NOOP_MODULE)
        functions = [
            FunctionConfig("noop-sync", handler="noop_handler.handler", memory_mb=256, code_path=str(code)),
            FunctionConfig(
                "noop-async",
                handler="noop_handler.handler",
                memory_mb=256,
                code_path=str(code),
                reserved_concurrency=concurrency,
            ),
        ]
        with LocalLambdaService(
            functions=functions, env=dict(os.environ), log_dir=Path(work) / "logs"
        ) as svc:
            client = client_for(svc.url)
            begin = time.perf_counter()
            client.invoke(FunctionName="noop-sync", Payload=b"{}")
            cold_ms = (time.perf_counter() - begin) * 1000

            latencies = []
            begin = time.perf_counter()
            for _ in range(sync_calls):
                start = time.perf_counter()
                client.invoke(FunctionName="noop-sync", Payload=b"{}")
                latencies.append((time.perf_counter() - start) * 1000)
            sync_rate = sync_calls / (time.perf_counter() - begin)

            # Warm the async function's sandboxes first: the figure is about warm invocations.
            for _ in range(concurrency):
                client.invoke(FunctionName="noop-async", InvocationType="Event", Payload=b"{}")
            _wait_done(svc, concurrency)

            per_client = [events // clients + (1 if i < events % clients else 0) for i in range(clients)]
            accept_ms: list[float] = []
            lock = threading.Lock()

            def send(count: int) -> None:
                own = client_for(svc.url)
                for _ in range(count):
                    start = time.perf_counter()
                    own.invoke(FunctionName="noop-async", InvocationType="Event", Payload=b"{}")
                    with lock:
                        accept_ms.append((time.perf_counter() - start) * 1000)

            threads = [threading.Thread(target=send, args=(n,)) for n in per_client]
            begin = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            _wait_done(svc, concurrency + events)
            async_rate = events / (time.perf_counter() - begin)
            stats = svc.stats()["functions"]["noop-async"]

    return {
        "noop_invocations_per_s": round(async_rate, 1),
        "sync_sequential_invocations_per_s": round(sync_rate, 1),
        "sync_warm_latency_ms_p50": round(statistics.median(latencies), 2),
        "sync_warm_latency_ms_p95": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 2),
        "async_accept_ms_p50": round(statistics.median(accept_ms), 2),
        "cold_start_ms": round(cold_ms, 1),
        "async_cold_starts": stats["cold_starts"],
        "events": events,
        "reserved_concurrency": concurrency,
        "client_threads": clients,
        "cpus": os.cpu_count(),
    }


def _wait_done(svc: LocalLambdaService, total: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = svc.stats()["functions"]["noop-async"]
        if stats["success"] + stats["handled_error"] >= total and stats["queued"] == 0:
            return
        time.sleep(0.01)
    raise RuntimeError(f"the service did not finish {total} events in {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument(
        "--concurrency", type=int, default=4, help="the async function's reserved concurrency"
    )
    parser.add_argument("--clients", type=int, default=4, help="threads sending async invokes")
    parser.add_argument("--sync-calls", type=int, default=200)
    args = parser.parse_args(argv)
    result = run(args.events, args.concurrency, args.clients, args.sync_calls)
    print(f"cold start:                 {result['cold_start_ms']} ms")
    print(
        f"sync, sequential, warm:     {result['sync_sequential_invocations_per_s']} invocations/s "
        f"(p50 {result['sync_warm_latency_ms_p50']} ms, p95 {result['sync_warm_latency_ms_p95']} ms)"
    )
    print(
        f"async no-op, {args.clients} clients, concurrency {args.concurrency}: "
        f"{result['noop_invocations_per_s']} invocations/s (202 in {result['async_accept_ms_p50']} ms p50)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

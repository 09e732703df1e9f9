"""How fast a task that timed out on Lambda runs again on the fallback executor.

A real Airflow with the RoutingExecutor; its policy sends every task to a LambdaExecutor child (the local
Lambda service, moto's SQS) with ``fallback: [local]``. Each ``too_slow_*`` task outlives the function's
timeout when it runs inside Lambda; the handler stops it and reports the timeout; the router hands the same
try to a LocalExecutor child, where the task returns at once.

Latency of one task = the fallback run's start (``task_instance.start_date``, written by its ``/run`` call)
minus the last sign of life of the Lambda run (the task body appends a timestamp every 50 ms while it runs
inside Lambda, so its last line is when the handler stopped it, within 50 ms).

    python benchmarks/fallback_latency.py [--tasks 10] [--function-timeout 20]

The function's sandboxes are warmed first (``--warm-up``, one task per sandbox that imports Airflow's task runner):
a cold sandbox on a loaded machine can spend the whole timeout importing it, and a run stopped before its body
started leaves no beat to measure from. The last line is JSON with ``fallback_p50_s`` and ``fallback_max_s``; the
target is p50 under 2 s. ``run_scenario`` is also what the end-to-end test of the Lambda fallback drives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

# devtools/ lives in the checkout, not the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.devstack import AirflowStack
from devtools.lambda_settings import airflow_with_local_lambda
from devtools.machine import describe_machine, machine_line

ROUTER = "hybrid_router.router.RoutingExecutor"
DAG_ID = "lambda_fallback"
SECRET = "fallback-benchmark-secret"

DAG = """
import os
import pathlib
import time

import pendulum
from airflow.sdk import dag, task

BEATS = pathlib.Path({beats!r})


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, default_args={{"retries": 0}})
def lambda_fallback():
    @task
    def too_slow(i):
        if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
            # Inside Lambda: outlive the function's timeout, leaving a trail of timestamps until stopped.
            beat = BEATS / f"too_slow_{{i}}"
            while True:
                with open(beat, "a") as fh:
                    fh.write(f"{{time.time()}}\\n")
                time.sleep(0.05)
        print("too_slow", i, "finished on the fallback executor")

    @task
    def quick(i):
        print("quick", i, "ran in", os.environ.get("AWS_LAMBDA_FUNCTION_NAME") or "no Lambda")
        # Long enough for the sandbox's memory watchers (each finds new processes every 0.5 s and reads Pss every
        # 0.3 s) to each see the run's whole tree: a sub-second run's peak is a matter of their sampling moments.
        time.sleep(1.5)

    for i in range({slow}):
        too_slow.override(task_id=f"too_slow_{{i}}")(i)
    for i in range({quick}):
        quick.override(task_id=f"quick_{{i}}")(i)


lambda_fallback()
"""

# Tasks that overlap (each sleeps) so that each gets a sandbox of its own, which imports Airflow's task runner
# once; one that outlives a cold sandbox's timeout falls back and leaves that sandbox warm all the same.
WARM_UP_DAG_ID = "lambda_fallback_warm_up"
WARM_UP_DAG = """
import time

import pendulum
from airflow.sdk import dag, task


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, default_args={{"retries": 0}})
def lambda_fallback_warm_up():
    @task
    def warm(i):
        time.sleep(2)

    for i in range({count}):
        warm.override(task_id=f"warm_{{i}}")(i)


lambda_fallback_warm_up()
"""

POLICY = """
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: {concurrency}
    limits: {{max_duration: 15m, max_memory_mb: 10240}}
  local: {{class: LocalExecutor, max_concurrency: 4}}
defaults: {{expected_duration: 1m, memory_mb: 512, run_on: local}}
settings: {{fallback_mode: same_try, max_fallbacks: 1}}
rules:
  # No overflow: every task waits for room on Lambda, so each one times out there and is measured.
  - name: lambda first
    run_on: lambda
    fallback: [local]
"""


@dataclass
class Scenario:
    stack: AirflowStack
    run_id: str
    state: str
    beats: Path

    def task_instances(self) -> dict[str, dict[str, Any]]:
        return {ti["task_id"]: ti for ti in self.stack.task_instances(DAG_ID, self.run_id)}

    def external_ids(self) -> dict[str, str]:
        rows = self.stack.sql(
            "SELECT task_id, external_executor_id FROM task_instance WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, self.run_id),
        )
        return dict(rows)

    def audit(self) -> list[tuple[str, str, dict[str, Any]]]:
        rows = self.stack.sql(
            "SELECT event, task_id, extra FROM log WHERE dag_id = ? AND event LIKE 'hybrid_router.%' ORDER BY id",
            (DAG_ID,),
        )
        return [(event, task_id, json.loads(extra)) for event, task_id, extra in rows]

    def latencies(self) -> dict[str, float]:
        """Per too_slow task: seconds from the Lambda run's last sign of life to the fallback run's start."""
        found = {}
        for task_id, ti in self.task_instances().items():
            beat_file = self.beats / task_id
            if not task_id.startswith("too_slow") or not beat_file.exists() or not ti["start_date"]:
                continue
            last_beat = float(beat_file.read_text().split()[-1])
            started = datetime.fromisoformat(ti["start_date"]).timestamp()
            found[task_id] = started - last_beat
        return found


@contextmanager
def run_scenario(
    root: Path,
    *,
    slow: int,
    quick: int,
    function_timeout_s: float = 10,
    concurrency: int = 3,
    timeout: float = 240,
    warm_up: int = 0,
) -> Iterator[Scenario]:
    """Start moto, the local Lambda service and Airflow with the router; run the DAG once (after a run of
    ``warm_up`` overlapping tasks, when asked); stop it all after."""
    from hybrid_router.lambda_exec.local.launcher import FunctionConfig

    dags, beats = root / "dags", root / "beats"
    dags.mkdir(parents=True)
    beats.mkdir()
    (dags / "lambda_fallback.py").write_text(
        textwrap.dedent(DAG.format(beats=str(beats), slow=slow, quick=quick))
    )
    if warm_up:
        (dags / "lambda_fallback_warm_up.py").write_text(textwrap.dedent(WARM_UP_DAG.format(count=warm_up)))
    policy = root / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY.format(concurrency=concurrency)))
    function = FunctionConfig(
        name="airflow-task",
        memory_mb=512,
        timeout_s=function_timeout_s,
        reserved_concurrency=concurrency,
        maximum_retry_attempts=0,
    )
    with airflow_with_local_lambda(
        root,
        dags,
        executor=ROUTER,
        function=function,
        secret=SECRET,
        config={"hybrid_router": {"policy_file": policy}},
    ) as lambda_stack:
        stack = lambda_stack.airflow
        if warm_up:
            stack.wait_run(WARM_UP_DAG_ID, stack.trigger(WARM_UP_DAG_ID), timeout=timeout)
        run_id = stack.trigger(DAG_ID)
        state = stack.wait_run(DAG_ID, run_id, timeout=timeout)
        yield Scenario(stack=stack, run_id=run_id, state=state, beats=beats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10, help="tasks that time out on Lambda")
    # Long enough for a cold sandbox to import Airflow's task runner and finish a warm-up task on a loaded machine
    # (8 s for the import alone at a load of 20 on two cores): a sandbox the timeout kills is not kept warm, and a
    # run stopped before its body started would not be measured at all (the latency counts from the body's last
    # beat).
    parser.add_argument("--function-timeout", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=3, help="the function's reserved concurrency")
    parser.add_argument(
        "--warm-up", type=int, default=None, help="tasks run first to warm sandboxes (default: --concurrency)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fallback-latency-") as tmp:
        with run_scenario(
            Path(tmp),
            slow=args.tasks,
            quick=0,
            function_timeout_s=args.function_timeout,
            concurrency=args.concurrency,
            warm_up=args.concurrency if args.warm_up is None else args.warm_up,
        ) as scenario:
            if scenario.state != "success":
                raise SystemExit(f"the run ended {scenario.state}; see {scenario.stack.log_dir}")
            latencies = scenario.latencies()
            fallbacks = [e for e, _, _ in scenario.audit() if e == "hybrid_router.fallback"]
    if len(latencies) != args.tasks:
        raise SystemExit(
            f"measured {len(latencies)} of {args.tasks} tasks ({sorted(latencies)}); "
            f"{len(fallbacks)} fallbacks in the audit log"
        )
    for task_id, seconds in sorted(latencies.items()):
        print(f"{task_id:14s} {seconds:6.3f} s")
    values = sorted(latencies.values())
    p50, worst = statistics.median(values), values[-1]
    print(machine_line())
    print(f"fallback latency over {len(values)} tasks: p50 {p50:.3f} s, max {worst:.3f} s")
    print(
        json.dumps(
            {
                "fallback_p50_s": round(p50, 3),
                "fallback_max_s": round(worst, 3),
                "tasks": len(values),
                "fallback_audit_rows": len(fallbacks),
                "function_timeout_s": args.function_timeout,
                # No AWS-like latency here: what is measured is the router's and the executor's own reaction.
                "latency_model": "none",
                "load_average_1m": round(os.getloadavg()[0], 2),
                "machine": describe_machine(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

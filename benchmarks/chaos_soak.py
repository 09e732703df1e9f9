"""Chaos soak: one run per try for hundreds of tasks while AWS misbehaves the way it really does.

A real Airflow (API server, scheduler, DAG processor) with the RoutingExecutor: every task goes to a
LambdaExecutor child (the local Lambda service running the project's handler, moto's SQS), with a LocalExecutor
child as overflow and fallback. One DAG maps ``--tasks`` short tasks (1-3 s each) whose bodies append a start and
an end line to a journal (``devtools/run_journal.py``). All through the run, the fault layer injects:

- every async event delivered twice, half the copies at once, half once the first run has ended, and 10% of
  Invoke answers lost (the event accepted, the caller sees a 5xx or a closed connection): the local Lambda
  service (``lambda_exec/local/faults.py``);
- 5% of the handler's SQS sends failing as the caller sees them (after botocore's own retries), in every
  sandbox, and the scheduler's SQS receives failing for 5 s once a minute: botocore's event hooks
  (``devtools/aws_faults.py``);
- the honest-speed latency model on top: 25 ms median per async Invoke, 8 ms per SQS call, p99 three times that.

The journal and the metadata database then say whether each task's body completed exactly once (``lost``,
``double_runs``: a second completed body, or two runs of one try at once), whether a retry was spent on an
infrastructure failure (``retries_spent``: tries beyond the first) and whether any task ended in another state
than success (``wrong_states``); the target for each is 0. The injected faults are counted by the fault layer,
not taken from the settings.

    python benchmarks/chaos_soak.py [--tasks 300] [--seed 1] [--database postgres|sqlite] [--keep]

The last line is one JSON object: ``tasks``, ``lost``, ``double_runs``, ``retries_spent``, ``wrong_states``,
``wall_s``, ``duplicates_delivered``, ``invoke_answers_lost``, ``sends_failed``, ``receive_outage_s`` and a few
figures more. The run's folder (logs, journal, database) is kept when anything went wrong, or with ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# devtools/ lives in the checkout, not the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.aws_faults import SqsFaults, injected, process_env
from devtools.devstack import StackError, wait_until
from devtools.lambda_settings import airflow_with_local_lambda, all_deliveries_ended
from devtools.machine import machine_line
from devtools.run_journal import JOURNAL_DAG_HELPERS, check_journal, read_journal
from hybrid_router.lambda_exec.local.faults import FaultSettings, Latency
from hybrid_router.lambda_exec.local.launcher import FunctionConfig

ROUTER = "hybrid_router.router.RoutingExecutor"
DAG_ID = "chaos_soak"
TASK_ID = "body"
FUNCTION = "airflow-task"
SECRET = "chaos-soak-secret"
# Long enough for a cold sandbox to import Airflow's task runner and run a 3 s body on a loaded 2-core machine:
# a run stopped at the deadline would be a fallback the soak did not ask for.
FUNCTION_TIMEOUT_S = 60
INVOKE_LATENCY_MS = 25.0
SQS_LATENCY_MS = 8.0
LATENCY_P99_FACTOR = 3.0
SEND_FAILURE_RATE = 0.05
LOST_ANSWER_RATE = 0.1
OUTAGE_EVERY_S = 60.0
OUTAGE_S = 5.0

DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task


@dag(
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1),
    catchup=False,
    max_active_tasks=%(active)d,
    # Retries are allowed so that a try failed by an infrastructure fault shows up as a spent retry.
    default_args={"retries": 2, "retry_delay": timedelta(seconds=2)},
)
def chaos_soak():
    @task
    def body(i):
        journaled_body(1 + i %% 3)

    body.expand(i=list(range(%(tasks)d)))


chaos_soak()
"""

POLICY = """
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: {lambda_slots}
    limits: {{max_duration: 15m, max_memory_mb: 10240}}
  local: {{class: LocalExecutor, max_concurrency: {local_slots}}}
defaults: {{expected_duration: 1m, memory_mb: 512, run_on: local}}
settings: {{fallback_mode: same_try, max_fallbacks: 2}}
rules:
  - name: lambda first
    run_on: lambda
    overflow: [local]
    fallback: [local]
"""


def outage_seconds(log_file: Path, every_s: float, epoch: float) -> tuple[float, int]:
    """Seconds during which receives were seen failing (per outage window, from its first failed receive to its
    last), and the number of windows in which any failed, from the fault layer's own log."""
    spans: dict[int, list[float]] = defaultdict(list)
    if log_file.exists():
        for line in log_file.read_text(encoding="utf-8").splitlines():
            event = json.loads(line)
            if event["event"] == "receive_failed":
                spans[int((event["at"] - epoch) // every_s)].append(event["at"])
    return sum(max(times) - min(times) for times in spans.values()), len(spans)


def audit_rows(stack: Any) -> list[tuple[str, dict[str, Any]]]:
    rows = stack.sql(
        "SELECT event, extra FROM log WHERE dag_id = ? AND event LIKE 'hybrid_router.%' ORDER BY id",
        (DAG_ID,),
    )
    return [(event, json.loads(extra or "{}")) for event, extra in rows]


def count_lines(path: Path, *needles: str) -> dict[str, int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {needle: text.count(needle) for needle in needles}


@contextmanager
def metadata_database(kind: str) -> Iterator[str | None]:
    """PostgreSQL's URL, or None for SQLite in the stack's home.

    PostgreSQL by default: the execution API lets one run claim a try by reading the task instance ``FOR UPDATE``
    before it marks it RUNNING, and SQLite ignores ``FOR UPDATE``, so two copies of one event whose ``/run``
    calls overlap both take the task there (Airflow's race, not the executor's).
    """
    if kind == "sqlite":
        yield None
        return
    from devtools.postgres import PostgresServer

    with PostgresServer() as server:
        yield server.url


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    dags, journal = root / "dags", root / "journal.txt"
    dags.mkdir(parents=True)
    journal.touch()
    source = JOURNAL_DAG_HELPERS + DAG
    (dags / f"{DAG_ID}.py").write_text(
        textwrap.dedent(source % {"journal": str(journal), "tasks": args.tasks, "active": args.max_active})
    )
    policy = root / "policy.yaml"
    policy.write_text(POLICY.format(lambda_slots=args.lambda_slots, local_slots=args.local_slots))

    faults_log = root / "aws-faults.jsonl"
    # One epoch for every process: the outage windows are the same wall-clock seconds everywhere.
    epoch = time.time()
    base_pythonpath = os.environ.get("PYTHONPATH")
    sandbox_faults = SqsFaults(
        latency_median_ms=SQS_LATENCY_MS,
        latency_p99_factor=LATENCY_P99_FACTOR,
        send_failure_rate=SEND_FAILURE_RATE,
        epoch=epoch,
        log_file=str(faults_log),
        seed=args.seed,
    )
    scheduler_faults = SqsFaults(
        latency_median_ms=SQS_LATENCY_MS,
        latency_p99_factor=LATENCY_P99_FACTOR,
        outage_every_s=OUTAGE_EVERY_S,
        outage_s=OUTAGE_S,
        epoch=epoch,
        log_file=str(faults_log),
        seed=args.seed,
    )
    delivery_faults = FaultSettings(
        invoke_latency=Latency.from_median_ms(INVOKE_LATENCY_MS, LATENCY_P99_FACTOR),
        duplicate_rate=1.0,
        duplicate_after_end_share=0.5,
        lost_answer_rate=LOST_ANSWER_RATE,
        lost_answer_mode="mixed",
        seed=args.seed,
    )
    function = FunctionConfig(
        name=FUNCTION,
        memory_mb=512,
        timeout_s=FUNCTION_TIMEOUT_S,
        reserved_concurrency=args.function_concurrency,
        maximum_retry_attempts=0,
        environment=process_env(sandbox_faults, base_pythonpath),
    )
    print(f"{machine_line()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(
        f"latency model: async Invoke log-normal median {INVOKE_LATENCY_MS:g} ms, each SQS call median "
        f"{SQS_LATENCY_MS:g} ms, p99 {LATENCY_P99_FACTOR:g}x the median",
        flush=True,
    )
    print(
        f"fault model: every async event delivered twice (half at once, half after the first run ended); "
        f"{LOST_ANSWER_RATE:.0%} of Invoke answers lost (5xx and closed connections in turn); "
        f"{SEND_FAILURE_RATE:.0%} of the handler's SQS sends failing; the scheduler's receives failing "
        f"{OUTAGE_S:g} s every {OUTAGE_EVERY_S:g} s; seed {args.seed}",
        flush=True,
    )
    print(
        f"workload: {args.tasks} mapped tasks of 1-3 s; router: lambda (max {args.lambda_slots}, function "
        f"reserved concurrency {args.function_concurrency}, timeout {FUNCTION_TIMEOUT_S} s), overflow and "
        f"fallback local (max {args.local_slots}); DAG max_active_tasks {args.max_active}; metadata database "
        f"{args.database}; work dir {root}",
        flush=True,
    )

    with (
        metadata_database(args.database) as database_url,
        airflow_with_local_lambda(
            root,
            dags,
            executor=ROUTER,
            function=function,
            secret=SECRET,
            config={"hybrid_router": {"policy_file": policy}},
            scheduler_env=process_env(scheduler_faults, base_pythonpath),
            database_url=database_url,
        ) as lambda_stack,
    ):
        stack, service = lambda_stack.airflow, lambda_stack.service
        service.set_delivery_faults(settings=delivery_faults)
        began = time.monotonic()
        run_id = stack.trigger(DAG_ID)
        state = stack.wait_run(DAG_ID, run_id, timeout=args.timeout)
        wall_s = time.monotonic() - began
        print(f"DAG run {run_id} ended {state} after {wall_s:.1f} s", flush=True)
        # The copies delivered after their first run's end come later; any of them could still run a body.
        settled = True
        try:
            wait_until(
                lambda: all_deliveries_ended(service, FUNCTION), args.settle_timeout, "every delivery to end"
            )
        except StackError as exc:
            settled = False
            print(f"not settled: {exc}", flush=True)
        settle_s = time.monotonic() - began - wall_s
        # From the database: the REST API gives at most [api] maximum_page_limit (100) task instances a page.
        tis = [
            {"map_index": map_index, "state": ti_state, "try_number": try_number, "external_id": external_id}
            for map_index, ti_state, try_number, external_id in stack.sql(
                "SELECT map_index, state, try_number, external_executor_id FROM task_instance "
                "WHERE dag_id = ? AND run_id = ?",
                (DAG_ID, run_id),
            )
        ]
        audit = audit_rows(stack)
        stats = service.stats()
        scheduler_log = stack.process_log("scheduler")

    expected = [(DAG_ID, TASK_ID, i) for i in range(args.tasks)]
    lines = read_journal(journal)
    report = check_journal(lines, expected)
    states = Counter(ti["state"] for ti in tis)
    retries_spent = sum(max(0, (ti["try_number"] or 1) - 1) for ti in tis)
    wrong_states = sum(1 for ti in tis if ti["state"] != "success") + (args.tasks - len(tis))
    double_runs = set(report.double_runs) | {attempt[:3] for attempt in report.overlaps}
    completed_runs = Counter(
        "local" if line.run.startswith("pid") else "lambda" for line in lines if line.what == "end"
    )
    finished_on = Counter((ti["external_id"] or "?").split("@", 1)[0] for ti in tis)
    routed = Counter(
        f"{extra.get('executor')} ({extra.get('how')})"
        for event, extra in audit
        if event == "hybrid_router.routed"
    )
    fallbacks = Counter(
        extra.get("reason", "?") for event, extra in audit if event == "hybrid_router.fallback"
    )
    counts = stats["functions"][FUNCTION]
    fault_counts = stats["faults"]
    aws_injected = injected(faults_log)
    outage_s, outage_windows = outage_seconds(faults_log, OUTAGE_EVERY_S, epoch)
    log_counts = count_lines(
        scheduler_log,
        "lambda infrastructure failure",
        "Ignoring the results of run",
        "did not take the task",
        "Ignoring a dead letter",
    )

    print(f"task states: {dict(states)}; tries beyond the first: {retries_spent}")
    print(f"final executor per task: {dict(finished_on)}; completed bodies by where: {dict(completed_runs)}")
    print(f"routing decisions: {dict(routed)}; fallbacks by reason: {dict(fallbacks)}")
    print(
        f"journal: {len(lines)} lines, {sum(report.completed.values())} completed bodies, lost {len(report.lost)}, "
        f"completed twice {len(report.double_runs)}, overlapping tries {len(report.overlaps)}, "
        f"stopped runs {report.stopped_runs}"
    )
    for label, items in (("lost", report.lost), ("double", sorted(double_runs))):
        if items:
            print(f"  {label}: {[task[2] for task in items][:20]}")
    print(
        "local Lambda service: "
        + ", ".join(
            f"{key} {counts.get(key, 0)}"
            for key in (
                "async_accepted",
                "invocations",
                "cold_starts",
                "success",
                "handled_error",
                "timeout",
                "crash",
                "dlq_sends",
                "expired",
            )
        )
        + f"; faults {json.dumps({k: v for k, v in fault_counts.items() if k != 'settings'})}"
    )
    print(
        f"SQS faults injected: {aws_injected}; receives failing over {outage_windows} outage windows, "
        f"{outage_s:.1f} s from first to last failure in all"
    )
    print(f"scheduler log: {log_counts}")
    print(
        f"wall: {wall_s:.1f} s to the DAG run's end ({args.tasks / wall_s * 60:.1f} tasks/min), then "
        f"{settle_s:.1f} s for every delivery to end{'' if settled else ' (not all ended)'}"
    )
    return {
        "tasks": len(tis),
        "lost": len(report.lost),
        "double_runs": len(double_runs),
        "retries_spent": retries_spent,
        "wrong_states": wrong_states,
        "wall_s": round(wall_s, 1),
        "duplicates_delivered": fault_counts["duplicates_delivered"],
        "invoke_answers_lost": fault_counts["invoke_answers_lost"],
        "sends_failed": aws_injected.get("send_failed", 0),
        "receive_outage_s": round(outage_s, 1),
        "receive_failures": aws_injected.get("receive_failed", 0),
        "stopped_runs": report.stopped_runs,
        "fallbacks": sum(fallbacks.values()),
        "finished_on_local": finished_on.get("local", 0),
        "dag_run_state": state,
        "settled": settled,
        "database": args.database,
        "cores": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--lambda-slots", type=int, default=8, help="the router's max_concurrency for lambda")
    # Room for the copies delivered at once beside the first runs, so a duplicate never delays a first run.
    parser.add_argument(
        "--function-concurrency", type=int, default=16, help="the function's reserved concurrency"
    )
    parser.add_argument("--local-slots", type=int, default=2, help="the router's max_concurrency for local")
    parser.add_argument("--max-active", type=int, default=16, help="the DAG's max_active_tasks")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the DAG run may take")
    parser.add_argument("--settle-timeout", type=float, default=600, help="seconds for late copies to end")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder even when all is well")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="chaos-soak-"))
    clean = False
    try:
        figures = run(args, root)
        clean = not any(figures[key] for key in ("lost", "double_runs", "retries_spent", "wrong_states"))
    finally:
        if clean and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept the run's folder: {root}", flush=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

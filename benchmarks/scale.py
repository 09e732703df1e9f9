"""Mapped no-op tasks (1,000) through a real scheduler: the router on the Lambda path against a LocalExecutor.

A real Airflow (API server, DAG processor, scheduler; PostgreSQL unless ``--database sqlite``) with the local
Lambda service and moto's SQS, under the AWS-like latency model (``devtools/latency.py``: async Invoke 25 ms
median, every SQS call 8 ms median, p99 3x, in every process) unless ``--no-latency``, runs one DAG of
``--tasks`` mapped no-op tasks under each of:

- ``router``: the ``RoutingExecutor`` as a new user runs it today: a policy that sends every task to one
  LambdaExecutor child (``max_concurrency`` = the function's reserved concurrency, ``--concurrency``), with
  the examples' defaults otherwise: a LocalExecutor child of ``--local-workers`` for fallback only (no
  overflow: every task takes the Lambda path), same-try fallback, the function as
  ``examples/aws/template.yaml`` makes it (2,048 MB, 900 s, no Lambda retries, events kept 300 s, the real
  handler), every ``[hybrid_router]`` and ``[lambda_executor]`` option at its default;
- ``local``: a bare LocalExecutor with ``--local-workers`` workers (``dispatch_local_executor.py``).

Both at Airflow's defaults otherwise: ``[core] parallelism`` 32 (``--core-parallelism``), the DAG's
``max_active_tasks`` 16 (``[core] max_active_tasks_per_dag``; ``--max-active-tasks``), ``max_tis_per_query``
16, ``scheduler_idle_sleep_time`` 1 s, ``scheduler_heartbeat_sec`` 5 s. Only the scheduler is restarted
between runs. After each restart an unmeasured warm-up run (``--warmup-tasks``) finds the DAG parsed and the
function's sandboxes warm, as in a busy deployment. The order alternates by round (router, local; then local,
router).

Per run (``scheduler_runs.py``): the DAG run's wall time (its ``end_date - start_date``); queued -> running
from the scheduler's first queueing of each try to the task's start; the scheduler main process's CPU (its
times at the run's start and end) and its peak RSS (sampled every 0.25 s through the run); and, to say where
the rest of the time goes, the CPU of the local Lambda service, its sandboxes, moto, the LocalExecutor
workers (the scheduler's descendants), the API server and the DAG processor, how busy the whole machine was,
and the AWS calls of the scheduler's process and of the others (the handler's, in the sandboxes).

    python benchmarks/scale.py [--tasks 1000] [--rounds 3] [--concurrency 8] [--local-workers 8]
                               [--core-parallelism 32] [--max-active-tasks N] [--warmup-tasks 16]
                               [--no-latency] [--database postgres|sqlite] [--keep]

It prints a line per run, a line of medians per variant, then one JSON object: ``wall_ratio``, ``p99_ratio``,
``cpu_ratio``, ``rss_ratio`` (router / local, each of medians over the rounds; the targets are 1.15, 1.0, 1.1
and 1.2), and per variant ``v`` (``router``, ``local``) ``wall_s_<v>``, ``queued_to_running_p50_s_<v>``,
``queued_to_running_p99_s_<v>``, ``scheduler_cpu_s_<v>``, ``peak_rss_mb_<v>`` and the other processes' CPU,
with ``tasks``, the settings, ``latency_model`` and ``machine``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# devtools/ lives in the checkout, not the wheel; scheduler_runs.py beside this file (a test loads this
# module by its path, without this folder on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from scheduler_runs import (
    RssSampler,
    StackCpu,
    calls_since,
    count_calls,
    database,
    percentile,
    queued_to_running,
    read_from,
    restart_scheduler,
    run_wall_s,
    snapshot,
    stack_roots,
    wait_lambda_idle,
    wait_run,
)

from devtools.aws_faults import SqsFaults, process_env
from devtools.lambda_settings import LambdaStack, airflow_with_local_lambda
from devtools.latency import AWS_LIKE, LatencyModel
from devtools.machine import describe_machine, machine_line
from hybrid_router.router.external_id import parse_external_id

HERE = Path(__file__).resolve().parent
VARIANTS = ("router", "local")
EXECUTOR_CLASSES = {
    "router": "hybrid_router.router.RoutingExecutor",
    "local": "dispatch_local_executor.SizedLocalExecutor",
}
DAG_ID = "scale"
WARMUP_DAG_ID = "scale_warm_up"
FUNCTION = "airflow-task"  # the function name of examples/airflow.cfg and examples/aws/template.yaml
SECRET = "scale-benchmark-secret"
TARGETS = {"wall_ratio": 1.15, "p99_ratio": 1.0, "cpu_ratio": 1.1, "rss_ratio": 1.2}
# Airflow's own defaults, where the dev stack sets shorter ones for its tests.
AIRFLOW_SCHEDULER_DEFAULTS = {"scheduler_idle_sleep_time": 1.0, "scheduler_heartbeat_sec": 5}
AIRFLOW_MAX_MAP_LENGTH = 1024  # [core] max_map_length

DAG = """
import pendulum
from airflow.sdk import dag, task


def build(dag_id, tasks):
    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False{dag_options})
    def mapped():
        @task
        def noop(i):
            return None

        noop.expand(i=list(range(tasks)))

    return mapped()


build({dag_id!r}, {tasks})
build({warmup_dag_id!r}, {warmup_tasks})
"""

# examples/policy.yaml's defaults and settings, one Lambda function (as examples/aws/template.yaml makes it).
POLICY = """
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: {concurrency}
    limits: {{max_duration: 15m, max_memory_mb: 2048}}
  local:
    class: LocalExecutor
    max_concurrency: {local_workers}
defaults: {{expected_duration: 2m, memory_mb: 512, run_on: local}}
settings: {{fallback_mode: same_try, max_fallbacks: 2}}
rules:
  - name: every task on lambda
    run_on: lambda
    fallback: [local]
"""


# -- one run -----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    variant: str
    round: int
    wall_s: float
    queued_to_running_s: list[float]
    not_measured: int  # task instances that never started or had no queued line
    peak_rss_mb: float
    rss_samples: int
    cpu: StackCpu
    load_max: float
    aws_calls: dict[str, int] = field(default_factory=dict)  # the scheduler's process only
    other_aws_calls: dict[str, int] = field(default_factory=dict)  # the rest: the handler's, in the sandboxes
    ran_on: dict[str, int] = field(default_factory=dict)  # per router child, from the external ids

    @property
    def p50(self) -> float:
        return percentile(self.queued_to_running_s, 50)

    @property
    def p99(self) -> float:
        return percentile(self.queued_to_running_s, 99)

    def line(self) -> str:
        cpu = self.cpu
        ran_on = f"; ran on {dict(sorted(self.ran_on.items()))}" if self.variant == "router" else ""
        unmeasured = f"; {self.not_measured} without a queued->running wait" if self.not_measured else ""
        return (
            f"round {self.round} {self.variant:6s} wall {self.wall_s:7.1f} s; queued->running p50"
            f" {self.p50:6.2f} s p99 {self.p99:6.2f} s; scheduler CPU {cpu.scheduler:6.1f} s, peak RSS"
            f" {self.peak_rss_mb:5.0f} MB ({self.rss_samples} samples); sandboxes {cpu.sandboxes:.1f} CPU-s,"
            f" Lambda service {cpu.lambda_service:.1f}, moto {cpu.moto:.1f}, Local workers"
            f" {cpu.scheduler_children:.1f}, API server {cpu.api_server:.1f}, DAG processor"
            f" {cpu.dag_processor:.1f}; stack {cpu.stack:.0f} CPU-s ({cpu.share(cpu.stack):.0%} of the"
            f" cores), machine {cpu.share(cpu.machine_busy):.0%} busy; AWS calls: scheduler"
            f" {sum(self.aws_calls.values())}, others {sum(self.other_aws_calls.values())}{ran_on}"
            f"{unmeasured}; load {self.load_max:.1f}"
        )


def warm_up(bench: LambdaStack, variant: str, timeout: float) -> None:
    """A small run right after the scheduler's restart: the DAG parsed, the function's sandboxes warm."""
    stack = bench.airflow
    run_id = stack.trigger(WARMUP_DAG_ID)
    state = wait_run(stack, WARMUP_DAG_ID, run_id, timeout)
    if state != "success":
        raise SystemExit(f"{variant}: warm-up run {run_id} ended {state}; see {stack.log_dir}")
    wait_lambda_idle(bench.service)


def measure(bench: LambdaStack, variant: str, round_number: int, calls_log: Path, timeout: float) -> Run:
    stack = bench.airflow
    scheduler_pid = restart_scheduler(stack, {"AIRFLOW__CORE__EXECUTOR": EXECUTOR_CLASSES[variant]})
    warm_up(bench, variant, timeout)
    roots = stack_roots(stack, scheduler_pid, bench.service, bench.moto)
    log_path = stack.process_log("scheduler")
    log_offset = log_path.stat().st_size
    calls_offset = calls_log.stat().st_size if calls_log.exists() else 0
    load_before = os.getloadavg()
    before = snapshot(roots)
    began = time.monotonic()
    with RssSampler(scheduler_pid) as rss:
        run_id = stack.trigger(DAG_ID)
        state = wait_run(stack, DAG_ID, run_id, timeout)
    cpu = StackCpu.between(before, snapshot(roots), time.monotonic() - began)
    load_max = max(*load_before, *os.getloadavg())
    if state != "success":
        raise SystemExit(f"{variant}: run {run_id} ended {state}; see {stack.log_dir}")
    waits, not_measured = queued_to_running(stack, DAG_ID, run_id, read_from(log_path, log_offset))
    external_ids = stack.sql(
        "SELECT external_executor_id FROM task_instance WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id)
    )
    parsed = [parse_external_id(value) for (value,) in external_ids]
    calls = calls_since(calls_log, calls_offset)
    run = Run(
        variant=variant,
        round=round_number,
        wall_s=run_wall_s(stack, DAG_ID, run_id),
        queued_to_running_s=waits,
        not_measured=not_measured,
        peak_rss_mb=rss.peak_mb,
        rss_samples=rss.samples,
        cpu=cpu,
        load_max=load_max,
        aws_calls=count_calls(c for c in calls if c["pid"] == scheduler_pid),
        other_aws_calls=count_calls(c for c in calls if c["pid"] != scheduler_pid),
        ran_on=dict(Counter((p.child if p else None) or "(none)" for p in parsed)),
    )
    wait_lambda_idle(bench.service)
    return run


# -- the stack ---------------------------------------------------------------------------------------------------


@contextmanager
def scale_stack(root: Path, args: argparse.Namespace, latency: LatencyModel | None) -> Iterator[LambdaStack]:
    """moto, the local Lambda service (one function) and Airflow, all with the latency model."""
    from hybrid_router.lambda_exec.local.launcher import FunctionConfig

    dags = root / "dags"
    dags.mkdir(parents=True)
    dag_options = "" if args.max_active_tasks is None else f", max_active_tasks={args.max_active_tasks}"
    (dags / "scale.py").write_text(
        textwrap.dedent(
            DAG.format(
                dag_options=dag_options,
                dag_id=DAG_ID,
                tasks=args.tasks,
                warmup_dag_id=WARMUP_DAG_ID,
                warmup_tasks=max(args.warmup_tasks, 1),
            )
        )
    )
    policy = root / "policy.yaml"
    policy.write_text(
        textwrap.dedent(POLICY.format(concurrency=args.concurrency, local_workers=args.local_workers))
    )
    # The checkout's benchmarks folder: the scheduler imports the sized LocalExecutor from it.
    extra_paths = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    calls_log = str(root / "aws-calls.jsonl")
    if latency is None:
        fault_env = process_env(SqsFaults(calls_log=calls_log), extra_paths)
    else:
        fault_env = latency.process_env(extra_paths, calls_log=calls_log)
    function = FunctionConfig(
        name=FUNCTION,
        memory_mb=2048,
        timeout_s=900,
        reserved_concurrency=args.concurrency,
        maximum_retry_attempts=0,
        maximum_event_age_s=300,
    )
    with (
        database(args.database) as database_url,
        airflow_with_local_lambda(
            root,
            dags,
            executor=EXECUTOR_CLASSES["local"],
            function=function,
            secret=SECRET,
            config={
                "core": {"parallelism": args.core_parallelism},
                "hybrid_router": {"policy_file": policy},
                "scheduler": AIRFLOW_SCHEDULER_DEFAULTS,
            },
            database_url=database_url,
            env={**fault_env, "DISPATCH_LOCAL_WORKERS": str(args.local_workers)},
        ) as bench,
    ):
        if latency is not None:
            bench.service.set_delivery_faults(settings=latency.lambda_faults())
        bench.airflow.wait_dag(DAG_ID, timeout=300)
        bench.airflow.wait_dag(WARMUP_DAG_ID, timeout=300)
        yield bench


# -- rounds and the report ---------------------------------------------------------------------------------------


def round_order(round_number: int) -> tuple[str, ...]:
    """Router first in odd rounds, LocalExecutor first in even ones (ABBA over two rounds)."""
    return VARIANTS if round_number % 2 else tuple(reversed(VARIANTS))


def _median(values: Iterable[float], digits: int = 2) -> float | None:
    values = list(values)
    return round(statistics.median(values), digits) if values else None


def _ratio(mine: float | None, theirs: float | None) -> float | None:
    return round(mine / theirs, 3) if mine is not None and theirs else None


def _median_calls(counts: list[dict[str, int]]) -> dict[str, float | None]:
    """Per operation, the median over the runs of how many calls a run made."""
    return {op: _median((c.get(op, 0) for c in counts), 1) for op in sorted({op for c in counts for op in c})}


def summary(runs: list[Run], args: argparse.Namespace, latency: LatencyModel | None) -> dict[str, Any]:
    """The JSON line: the four ratios first, then the medians behind them and where the time went."""
    figures: dict[str, Any] = {"tasks": args.tasks}
    medians: dict[str, Any] = {}
    for v in VARIANTS:
        mine = [r for r in runs if r.variant == v]
        medians.update(
            {
                f"wall_s_{v}": _median(r.wall_s for r in mine),
                f"queued_to_running_p50_s_{v}": _median((r.p50 for r in mine), 3),
                f"queued_to_running_p99_s_{v}": _median((r.p99 for r in mine), 3),
                f"scheduler_cpu_s_{v}": _median(r.cpu.scheduler for r in mine),
                f"peak_rss_mb_{v}": _median((r.peak_rss_mb for r in mine), 1),
                f"sandboxes_cpu_s_{v}": _median((r.cpu.sandboxes for r in mine), 1),
                f"lambda_service_cpu_s_{v}": _median((r.cpu.lambda_service for r in mine), 1),
                f"moto_cpu_s_{v}": _median((r.cpu.moto for r in mine), 1),
                f"local_workers_cpu_s_{v}": _median((r.cpu.scheduler_children for r in mine), 1),
                f"api_server_cpu_s_{v}": _median((r.cpu.api_server for r in mine), 1),
                f"dag_processor_cpu_s_{v}": _median((r.cpu.dag_processor for r in mine), 1),
                f"stack_cpu_s_{v}": _median((r.cpu.stack for r in mine), 1),
                f"stack_cpu_share_{v}": _median(r.cpu.share(r.cpu.stack) for r in mine),
                f"machine_busy_share_{v}": _median(r.cpu.share(r.cpu.machine_busy) for r in mine),
                f"scheduler_aws_calls_per_task_{v}": _median(
                    (sum(r.aws_calls.values()) / args.tasks for r in mine), 3
                ),
                f"walls_s_{v}": [round(r.wall_s, 1) for r in mine],
            }
        )
    figures["wall_ratio"] = _ratio(medians["wall_s_router"], medians["wall_s_local"])
    figures["p99_ratio"] = _ratio(
        medians["queued_to_running_p99_s_router"], medians["queued_to_running_p99_s_local"]
    )
    figures["cpu_ratio"] = _ratio(medians["scheduler_cpu_s_router"], medians["scheduler_cpu_s_local"])
    figures["rss_ratio"] = _ratio(medians["peak_rss_mb_router"], medians["peak_rss_mb_local"])
    figures["targets"] = TARGETS
    figures["meets_targets"] = {
        key: figures[key] is not None and figures[key] <= target for key, target in TARGETS.items()
    }
    figures.update(medians)
    router_runs = [r for r in runs if r.variant == "router"]
    ran_on: Counter[str] = Counter()
    for r in router_runs:
        ran_on.update(r.ran_on)
    figures["router_tasks_by_child"] = dict(sorted(ran_on.items()))  # over all rounds: "lambda" alone
    figures["scheduler_aws_calls_by_operation_router"] = _median_calls([r.aws_calls for r in router_runs])
    figures["other_aws_calls_by_operation_router"] = _median_calls([r.other_aws_calls for r in router_runs])
    figures["not_measured_queued_to_running"] = sum(r.not_measured for r in runs)
    figures["latency_model"] = "none" if latency is None else latency.to_dict()
    figures.update(
        {
            "rounds": args.rounds,
            "order": "alternating (router, local; then local, router)",
            "core_parallelism": args.core_parallelism,
            "function_concurrency": args.concurrency,
            "local_workers": args.local_workers,
            "max_active_tasks": args.max_active_tasks or "Airflow's default (16)",
            "scheduler": AIRFLOW_SCHEDULER_DEFAULTS,
            "warmup_tasks": args.warmup_tasks,
            "database": args.database,
            "load_average_max": max((r.load_max for r in runs), default=None),
            "machine": describe_machine(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    return figures


def variant_line(variant: str, figures: dict[str, Any]) -> str:
    def f(key: str) -> Any:
        return figures[f"{key}_{variant}"]

    return (
        f"{variant} medians over {figures['rounds']} round(s): wall {f('wall_s')} s, queued->running p50"
        f" {f('queued_to_running_p50_s')} s p99 {f('queued_to_running_p99_s')} s, scheduler CPU"
        f" {f('scheduler_cpu_s')} s, peak RSS {f('peak_rss_mb')} MB; sandboxes {f('sandboxes_cpu_s')} CPU-s,"
        f" Lambda service {f('lambda_service_cpu_s')}, moto {f('moto_cpu_s')}, Local workers"
        f" {f('local_workers_cpu_s')}, API server {f('api_server_cpu_s')}, DAG processor"
        f" {f('dag_processor_cpu_s')}; the stack {f('stack_cpu_share'):.0%} of the cores, the machine"
        f" {f('machine_busy_share'):.0%} busy"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=1000, help="mapped no-op tasks in the measured DAG")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the order alternates between them")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="the function's reserved concurrency (= the child's max)"
    )
    parser.add_argument("--local-workers", type=int, default=8, help="LocalExecutor workers (bare and child)")
    parser.add_argument("--core-parallelism", type=int, default=32, help="[core] parallelism, for both")
    parser.add_argument(
        "--max-active-tasks", type=int, default=None, help="the DAG's max_active_tasks (default: Airflow's)"
    )
    parser.add_argument(
        "--warmup-tasks", type=int, default=16, help="tasks of the warm-up run after each scheduler restart"
    )
    parser.add_argument("--no-latency", action="store_true", help="without the AWS-like latency model")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--timeout", type=float, default=3600, help="give up on a run after this long")
    parser.add_argument("--keep", action="store_true", help="keep the stack's logs after a successful run")
    args = parser.parse_args(argv)
    if not 1 <= args.tasks <= AIRFLOW_MAX_MAP_LENGTH:
        parser.error(
            f"--tasks must be 1 to {AIRFLOW_MAX_MAP_LENGTH} ([core] max_map_length), not {args.tasks}"
        )
    latency = None if args.no_latency else AWS_LIKE

    print(machine_line())
    print(f"latency model: {'none' if latency is None else latency.describe()}")
    print(
        f"{args.tasks} mapped no-op tasks; function concurrency {args.concurrency}, LocalExecutor"
        f" {args.local_workers} workers, [core] parallelism {args.core_parallelism}, max_active_tasks"
        f" {args.max_active_tasks or 'default (16)'}; database {args.database}"
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runs: list[Run] = []
    # Kept when a run fails or with --keep: the logs of every process are there.
    root = Path(tempfile.mkdtemp(prefix="scale-"))
    with scale_stack(root, args, latency) as bench:
        for number in range(1, args.rounds + 1):
            for variant in round_order(number):
                run = measure(bench, variant, number, root / "aws-calls.jsonl", args.timeout)
                runs.append(run)
                print(run.line(), flush=True)
    if args.keep:
        print(f"logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    figures = summary(runs, args, latency)
    for variant in VARIANTS:
        print(variant_line(variant, figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

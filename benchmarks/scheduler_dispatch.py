"""Dispatch through a real scheduler: one DAG of mapped ~1 s tasks under four executors, with AWS-like latency.

A real Airflow (API server, DAG processor, scheduler; ``devtools.devstack.AirflowStack``) runs the same DAG
(``--tasks`` mapped tasks, each sleeping ``--task-seconds``) under each of:

- ``provider``: the Amazon provider's ``AwsLambdaExecutor``;
- ``ours``: this project's ``LambdaExecutor``;
- ``router``: the ``RoutingExecutor``, every task to Lambda (``ours``' function) with Local as overflow;
- ``local``: a bare ``LocalExecutor`` (``dispatch_local_executor.SizedLocalExecutor``: its own worker count).

One local Lambda service and one moto SQS serve every run, with the same latency model (``devtools.latency``:
async Invoke 25 ms median, every SQS call 8 ms median, p99 3x, in every process) unless ``--no-latency``. Same
settings for all: ``[core] parallelism`` 32, ``max_tis_per_query`` at its default, Airflow's default
``scheduler_idle_sleep_time`` (1 s), function concurrency 16 (each function's reserved concurrency), 16 Local
workers (bare, and the router's child with its default prefetch), ``max_active_tasks`` = the task count.
Airflow's metadata database is PostgreSQL (``--database``; SQLite's single writer stalled the API server past
its callers' timeouts when 32 task runners called it at once, under the router). Only the scheduler is restarted
between runs. The local Lambda service sends an async event that finds its function at its concurrency limit back
to its queue and tries it again after 1 s, the wait doubling up to 5 min, as AWS documents for throttled async
events: an executor that invokes past the function's concurrency (the provider's, up to ``parallelism``) pays those
waits here as on AWS; ``throttled_retries_<e>`` counts them. Each Lambda function is warmed first (a run of
``--warmup-tasks``), so every measured run finds warm sandboxes, as a busy deployment does.

Two handler modes (``--handlers``), each its own JSON line:

- ``full``: each side's real handler. The provider's is its documented example, run unchanged
  (``airflow/providers/amazon/aws/executors/aws_lambda/docker/app.py``: the task's command in a new Python
  process, then ``{task_key, return_code}`` to SQS); ours is ``hybrid_router.lambda_exec.handler.handler``
  (Airflow's task runner forked from a warm sandbox). Both run Airflow's task runner in the sandboxes, on the
  same two cores as everything else;
- ``api_only``: the same handler for both sides (``dispatch_handlers.py``): the task runner's execution-API
  calls only (``/run`` to claim, the task's duration asleep, ``/state`` success), each reporting in its executor's
  format. The sandboxes then cost next to no CPU and the executors are what is measured. ``local`` runs once per
  round and counts for both lines (it has no handler); the router's overflow runs real tasks on Local.

The order alternates by round (forwards, then backwards). Per run:

- wall time: the DAG run's ``end_date - start_date`` (set by the scheduler);
- queued -> running: from the scheduler's first queueing of the try to the task instance's ``start_date`` (its
  ``/run``). The first queueing is the scheduler's own log line ("Setting the following tasks to queued state",
  with each task instance's id and try): the router moves ``queued_dttm`` (a same-try fallback, a long wait) and
  Airflow keeps no history row for a first try, but it cannot move a line the scheduler already wrote;
- scheduler CPU (user + system) and peak RSS (``VmHWM``) of the scheduler's main process only;
- task-body CPU apart: Local workers (the scheduler's descendants and its reaped children) and Lambda sandboxes
  (the local service's descendants), with the CPU of moto, the local service itself, the API server, the DAG
  processor and the whole machine (``/proc/stat``) during the run, which says where the time goes;
- AWS calls made by the scheduler's process (its executors), counted by the fault layer's ``calls_log``.

    python benchmarks/scheduler_dispatch.py [--tasks 200] [--rounds 3] [--handlers full,api_only]
                                            [--executors provider,ours,router,local] [--no-latency]
                                            [--database postgres|sqlite] [--keep]

Each JSON line holds, per executor ``e`` in ``provider``, ``ours``, ``router``, ``local``: ``wall_s_<e>``,
``queued_to_running_p50_s_<e>``, ``queued_to_running_p99_s_<e>``, ``scheduler_cpu_s_<e>``,
``scheduler_peak_rss_mb_<e>``, ``task_body_cpu_s_<e>``, ``stack_cpu_share_<e>`` (the benchmark's processes' CPU
over both cores' time: near 100% says the machine's CPU bounds the run), ``machine_busy_share_<e>`` (anything's,
other load included) (medians over the rounds),
``speedup_vs_provider`` (the provider's median wall time / ours), ``aws_calls_per_task`` (ours),
``latency_model`` and the machine. The last line is ``api_only`` when it ran: the variant where the executors
are what is measured.
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
    StackCpu,
    calls_since,
    count_calls,
    database,
    first_queued,  # noqa: F401  (the benchmark's tests read it here)
    peak_rss_mb,
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
from devtools.devstack import (
    FAKE_AWS_ENV,
    LOOPBACK,
    AirflowStack,
    MotoServer,
    free_port,
)
from devtools.lambda_settings import local_lambda_settings
from devtools.latency import AWS_LIKE, LatencyModel
from devtools.machine import describe_machine, machine_line

HERE = Path(__file__).resolve().parent
EXECUTORS = ("provider", "ours", "router", "local")
HANDLERS = ("full", "api_only")
EXECUTOR_CLASSES = {
    "provider": "airflow.providers.amazon.aws.executors.aws_lambda.lambda_executor.AwsLambdaExecutor",
    "ours": "hybrid_router.lambda_exec.LambdaExecutor",
    "router": "hybrid_router.router.RoutingExecutor",
    "local": "dispatch_local_executor.SizedLocalExecutor",
}
DAG_ID = "scheduler_dispatch"
WARMUP_DAG_ID = "scheduler_dispatch_warm_up"
SECRET = "scheduler-dispatch-secret"
CORE_PARALLELISM = 32
AIRFLOW_DEFAULT_IDLE_SLEEP_S = 1.0

DAG = """
import time

import pendulum
from airflow.sdk import dag, task


def build(dag_id, tasks):
    @dag(
        dag_id=dag_id,
        schedule=None,
        start_date=pendulum.datetime(2024, 1, 1),
        catchup=False,
        max_active_tasks=tasks,
        default_args={{"retries": 0}},
    )
    def mapped():
        @task
        def work(i):
            time.sleep({task_seconds})
            return None

        work.expand(i=list(range(tasks)))

    return mapped()


build({dag_id!r}, {tasks})
build({warmup_dag_id!r}, {warmup_tasks})
"""

POLICY = """
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: {concurrency}
    limits: {{max_duration: 15m, max_memory_mb: 10240}}
  local: {{class: LocalExecutor, max_concurrency: {local_workers}}}
defaults: {{expected_duration: 1m, memory_mb: 512, run_on: local}}
rules:
  - name: lambda, local as overflow
    run_on: lambda
    overflow: [local]
"""

# -- what one run measures ---------------------------------------------------------------------------------------


@dataclass
class Run:
    executor: str
    handler: str | None  # None: no Lambda handler (local)
    round: int
    wall_s: float = 0.0
    queued_to_running_s: list[float] = field(default_factory=list)
    scheduler_cpu_s: float = 0.0
    scheduler_peak_rss_mb: float = 0.0
    local_workers_cpu_s: float = 0.0
    sandboxes_cpu_s: float = 0.0
    lambda_service_cpu_s: float = 0.0
    moto_cpu_s: float = 0.0
    api_server_cpu_s: float = 0.0
    dag_processor_cpu_s: float = 0.0
    machine_busy_cpu_s: float = 0.0
    measured_s: float = 0.0  # between the CPU snapshots: the DAG run and the wait to see its end
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    aws_calls: dict[str, int] = field(default_factory=dict)
    handler_aws_calls: dict[str, int] = field(default_factory=dict)
    # Tries of an async event that found the function at its concurrency limit (each waits its retry interval).
    throttled_retries: int = 0

    @property
    def task_body_cpu_s(self) -> float:
        return self.local_workers_cpu_s + self.sandboxes_cpu_s

    @property
    def stack_cpu_s(self) -> float:
        """CPU of every process of the benchmark's stack (not of other load on the machine)."""
        return (
            self.scheduler_cpu_s
            + self.task_body_cpu_s
            + self.lambda_service_cpu_s
            + self.moto_cpu_s
            + self.api_server_cpu_s
            + self.dag_processor_cpu_s
        )

    def line(self) -> str:
        label = self.executor + (f" ({self.handler})" if self.handler else "")
        q2r = self.queued_to_running_s
        return (
            f"round {self.round} {label:20s} wall {self.wall_s:7.2f} s; queued->running p50"
            f" {percentile(q2r, 50):6.2f} s p99 {percentile(q2r, 99):6.2f} s; scheduler CPU"
            f" {self.scheduler_cpu_s:6.2f} s, peak RSS {self.scheduler_peak_rss_mb:5.0f} MB; task bodies CPU"
            f" {self.task_body_cpu_s:6.1f} s (local {self.local_workers_cpu_s:.1f}, sandboxes"
            f" {self.sandboxes_cpu_s:.1f}); moto {self.moto_cpu_s:.1f} s, Lambda service"
            f" {self.lambda_service_cpu_s:.1f} s, API server {self.api_server_cpu_s:.1f} s; machine busy"
            f" {self.machine_busy_cpu_s:.0f} CPU-s ({self.busy_share():.0%} of both cores; the stack"
            f" {self.stack_cpu_s:.0f} CPU-s, {self.stack_share():.0%}); AWS calls"
            f" {sum(self.aws_calls.values())}; events throttled by concurrency {self.throttled_retries};"
            f" load {self.load_average[0]:.1f}"
        )

    def stack_share(self) -> float:
        """The share of both cores the stack's own processes used while the run was measured."""
        cores = os.cpu_count() or 1
        return self.stack_cpu_s / (self.measured_s * cores) if self.measured_s else 0.0

    def busy_share(self) -> float:
        """How busy both cores were (by anything: this benchmark or other load) while the run was measured."""
        cores = os.cpu_count() or 1
        return self.machine_busy_cpu_s / (self.measured_s * cores) if self.measured_s else 0.0


# -- the stack -----------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    stack: AirflowStack
    service: Any
    moto: MotoServer
    calls_log: Path
    queues: dict[str, str]
    args: argparse.Namespace


def function_configs(queues: dict[str, str], args: argparse.Namespace) -> list[Any]:
    """The four functions: each side's real handler and the API-only one, 16 (``--concurrency``) at once each."""
    import airflow.providers.amazon.aws.executors.aws_lambda as provider_lambda

    from hybrid_router.lambda_exec.local.launcher import FunctionConfig

    common = {
        "memory_mb": 2048,  # the provider's handler starts a new Python process per task: room for two
        "timeout_s": 600,
        "reserved_concurrency": args.concurrency,
        "maximum_retry_attempts": 0,
        "maximum_event_age_s": 3600,  # a run on a loaded machine must not expire events the executor waits on
    }
    provider_env = {
        "QUEUE_URL": queues["provider-results"],
        # The example handler runs its command's bare ``python``: this interpreter, as in its image.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    task_seconds = {"DISPATCH_TASK_SECONDS": str(args.task_seconds)}
    return [
        FunctionConfig(
            name="provider-full",
            code_path=str(Path(provider_lambda.__file__).parent / "docker"),
            handler="app.lambda_handler",
            environment=provider_env,
            dead_letter_queue_url=queues["provider-dlq"],
            **common,
        ),
        FunctionConfig(name="ours-full", dead_letter_queue_url=queues["ours-dlq"], **common),
        FunctionConfig(
            name="provider-api_only",
            code_path=str(HERE),
            handler="dispatch_handlers.provider_api_only",
            environment={**provider_env, **task_seconds},
            dead_letter_queue_url=queues["provider-dlq"],
            **common,
        ),
        FunctionConfig(
            name="ours-api_only",
            code_path=str(HERE),
            handler="dispatch_handlers.hybrid_api_only",
            environment=task_seconds,
            dead_letter_queue_url=queues["ours-dlq"],
            **common,
        ),
    ]


@contextmanager
def bench_stack(root: Path, args: argparse.Namespace, latency: LatencyModel | None) -> Iterator[Bench]:
    """moto, the local Lambda service (four functions) and Airflow, all with the latency model; stop all after."""
    from hybrid_router.lambda_exec.local.faults import FaultSettings
    from hybrid_router.lambda_exec.local.launcher import LocalLambdaService

    dags = root / "dags"
    dags.mkdir(parents=True)
    (dags / "scheduler_dispatch.py").write_text(
        textwrap.dedent(
            DAG.format(
                dag_id=DAG_ID,
                tasks=args.tasks,
                warmup_dag_id=WARMUP_DAG_ID,
                warmup_tasks=max(args.warmup_tasks, 1),
                task_seconds=args.task_seconds,
            )
        )
    )
    policy = root / "policy.yaml"
    policy.write_text(
        textwrap.dedent(POLICY.format(concurrency=args.concurrency, local_workers=args.local_workers))
    )
    calls_log = root / "aws-calls.jsonl"
    # The checkout's benchmarks folder: the scheduler imports the sized LocalExecutor from it.
    extra_paths = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    if latency is None:
        fault_env = process_env(SqsFaults(calls_log=str(calls_log)), extra_paths)
    else:
        fault_env = latency.process_env(extra_paths, calls_log=str(calls_log))
    lambda_port = free_port()
    lambda_url = f"http://{LOOPBACK}:{lambda_port}"
    with database(args.database) as database_url, MotoServer(log_dir=root) as moto:
        names = ("provider-results", "provider-dlq", "ours-results", "ours-dlq")
        queues = {name: moto.create_queue(name) for name in names}
        ours = local_lambda_settings(
            function_name="ours-full",
            results_queue_url=queues["ours-results"],
            dead_letter_queue_url=queues["ours-dlq"],
            signing_secret=SECRET,
            lambda_endpoint_url=lambda_url,
            sqs_endpoint_url=moto.url,
            local_log_dir=root / "lambda-logs",
        )
        env = {
            **fault_env,
            "AWS_ENDPOINT_URL_LAMBDA": lambda_url,
            "AWS_ENDPOINT_URL_SQS": moto.url,
            "AIRFLOW_CONN_AWS_DEFAULT": "aws://",
            "DISPATCH_LOCAL_WORKERS": str(args.local_workers),
        }
        stack = AirflowStack(
            home=root / "airflow",
            dags_folder=dags,
            executor=EXECUTOR_CLASSES["local"],
            parallelism=CORE_PARALLELISM,
            database_url=database_url,
            env=env,
            config={
                "lambda_executor": ours,
                "aws_lambda_executor": {
                    "function_name": "provider-full",
                    "queue_url": queues["provider-results"],
                    "dead_letter_queue_url": queues["provider-dlq"],
                    "region_name": FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
                    "check_health_on_startup": True,
                },
                "hybrid_router": {"policy_file": policy},
                "scheduler": {"scheduler_idle_sleep_time": args.idle_sleep},
            },
        )
        service_env = {**stack.env, **FAKE_AWS_ENV, "AWS_ENDPOINT_URL_SQS": moto.url}
        service = LocalLambdaService(
            functions=function_configs(queues, args),
            env=service_env,
            sqs_endpoint_url=moto.url,
            port=lambda_port,
            log_dir=root / "lambda-logs",
            account_concurrency=4 * args.concurrency,
            # Warm sandboxes stay warm between a function's runs, however long the other variants take.
            idle_sandbox_ttl_s=6 * 3600,
            faults=FaultSettings() if latency is None else latency.lambda_faults(),
            log_level="WARNING",
        )
        with service, stack:
            stack.wait_dag(DAG_ID, timeout=180)
            stack.wait_dag(WARMUP_DAG_ID, timeout=180)
            yield Bench(stack, service, moto, calls_log, queues, args)


def use_executor(bench: Bench, executor: str, handler: str | None) -> int:
    """Restart only the scheduler, with ``executor`` (and the functions of ``handler``); its main process id."""
    suffix = handler or "full"
    changes = {
        "AIRFLOW__CORE__EXECUTOR": EXECUTOR_CLASSES[executor],
        "AIRFLOW__LAMBDA_EXECUTOR__FUNCTION_NAME": f"ours-{suffix}",
        "AIRFLOW__AWS_LAMBDA_EXECUTOR__FUNCTION_NAME": f"provider-{suffix}",
    }
    return restart_scheduler(bench.stack, changes)


def measure(
    bench: Bench, executor: str, handler: str | None, round_number: int, dag_id: str, warm_up: bool = False
) -> Run:
    stack = bench.stack
    scheduler_pid = use_executor(bench, executor, handler)
    roots = stack_roots(stack, scheduler_pid, bench.service, bench.moto)
    log_path = stack.process_log("scheduler")
    log_offset = log_path.stat().st_size
    calls_offset = bench.calls_log.stat().st_size if bench.calls_log.exists() else 0
    load_before = os.getloadavg()
    function = FUNCTION_OF.get(executor, "").format(handler=handler or "full")
    throttled_before = throttled_retries(bench.service, function)
    before = snapshot(roots)
    began = time.monotonic()
    run_id = stack.trigger(dag_id)
    state = wait_run(stack, dag_id, run_id, bench.args.timeout)
    cpu = StackCpu.between(before, snapshot(roots), time.monotonic() - began)
    load_after = os.getloadavg()
    if state != "success" and not warm_up:
        raise SystemExit(f"{executor} ({handler}): run {run_id} ended {state}; see {stack.log_dir}")
    q2r, missing = queued_to_running(stack, dag_id, run_id, read_from(log_path, log_offset))
    if missing:
        print(f"  ({missing} of {len(q2r) + missing} task instances never started or had no queued line)")
    all_calls = calls_since(bench.calls_log, calls_offset)
    run = Run(
        executor=executor,
        handler=handler,
        round=round_number,
        wall_s=run_wall_s(stack, dag_id, run_id),
        queued_to_running_s=q2r,
        scheduler_cpu_s=cpu.scheduler,
        scheduler_peak_rss_mb=peak_rss_mb(scheduler_pid),
        local_workers_cpu_s=cpu.scheduler_children,
        sandboxes_cpu_s=cpu.sandboxes,
        lambda_service_cpu_s=cpu.lambda_service,
        moto_cpu_s=cpu.moto,
        api_server_cpu_s=cpu.api_server,
        dag_processor_cpu_s=cpu.dag_processor,
        machine_busy_cpu_s=cpu.machine_busy,
        measured_s=cpu.measured_s,
        load_average=tuple(max(a, b) for a, b in zip(load_before, load_after, strict=True)),  # type: ignore[arg-type]
        aws_calls=count_calls(call for call in all_calls if call["pid"] == scheduler_pid),
        handler_aws_calls=count_calls(call for call in all_calls if call["pid"] != scheduler_pid),
    )
    wait_lambda_idle(bench.service)
    run.throttled_retries = throttled_retries(bench.service, function) - throttled_before
    return run


# The local Lambda function each executor invokes ({handler}: full or api_only); local invokes none.
FUNCTION_OF = {"provider": "provider-{handler}", "ours": "ours-{handler}", "router": "ours-{handler}"}


def throttled_retries(service: Any, function: str) -> int:
    """How many times so far an async event of ``function`` found it at its concurrency limit (0 for none)."""
    if not function:
        return 0
    return int(service.stats()["functions"].get(function, {}).get("throttled_retries", 0))


# -- rounds and the report ---------------------------------------------------------------------------------------


def plan(executors: list[str], handlers: list[str]) -> list[tuple[str, str | None]]:
    """One round's runs, in order: each Lambda executor with each handler, ``local`` once."""
    runs: list[tuple[str, str | None]] = []
    for handler in handlers:
        runs += [(e, handler) for e in executors if e != "local"]
        if "local" in executors and ("local", None) not in runs:
            runs.append(("local", None))
    return runs


def summary(
    variant: str, runs: list[Run], args: argparse.Namespace, latency: LatencyModel | None
) -> dict[str, Any]:
    """The JSON line of one handler mode: medians over the rounds, per executor."""
    figures: dict[str, Any] = {"variant": variant}
    by_executor = {e: [r for r in runs if r.executor == e] for e in EXECUTORS}

    def median(values: Iterable[float], digits: int = 2) -> float | None:
        values = list(values)
        return round(statistics.median(values), digits) if values else None

    for e, mine in by_executor.items():
        figures[f"wall_s_{e}"] = median(r.wall_s for r in mine)
        figures[f"queued_to_running_p50_s_{e}"] = median(
            (percentile(r.queued_to_running_s, 50) for r in mine), 3
        )
        figures[f"queued_to_running_p99_s_{e}"] = median(
            (percentile(r.queued_to_running_s, 99) for r in mine), 3
        )
        figures[f"scheduler_cpu_s_{e}"] = median(r.scheduler_cpu_s for r in mine)
        figures[f"scheduler_peak_rss_mb_{e}"] = median((r.scheduler_peak_rss_mb for r in mine), 0)
        figures[f"task_body_cpu_s_{e}"] = median((r.task_body_cpu_s for r in mine), 1)
        figures[f"sandboxes_cpu_s_{e}"] = median((r.sandboxes_cpu_s for r in mine), 1)
        figures[f"local_workers_cpu_s_{e}"] = median((r.local_workers_cpu_s for r in mine), 1)
        figures[f"moto_cpu_s_{e}"] = median((r.moto_cpu_s for r in mine), 1)
        figures[f"lambda_service_cpu_s_{e}"] = median((r.lambda_service_cpu_s for r in mine), 1)
        figures[f"api_server_cpu_s_{e}"] = median((r.api_server_cpu_s for r in mine), 1)
        figures[f"machine_busy_share_{e}"] = median(r.busy_share() for r in mine)
        figures[f"stack_cpu_s_{e}"] = median((r.stack_cpu_s for r in mine), 1)
        figures[f"stack_cpu_share_{e}"] = median(r.stack_share() for r in mine)
        figures[f"aws_calls_per_task_{e}"] = median((sum(r.aws_calls.values()) / args.tasks for r in mine), 3)
        figures[f"walls_s_{e}"] = [round(r.wall_s, 2) for r in mine]
        figures[f"throttled_retries_{e}"] = median((r.throttled_retries for r in mine), 0)
    provider, ours = figures["wall_s_provider"], figures["wall_s_ours"]
    figures["speedup_vs_provider"] = round(provider / ours, 2) if provider and ours else None
    figures["aws_calls_per_task"] = figures["aws_calls_per_task_ours"]
    figures["aws_calls_by_operation_ours"] = _median_counts([r.aws_calls for r in by_executor["ours"]])
    figures["aws_calls_by_operation_provider"] = _median_counts(
        [r.aws_calls for r in by_executor["provider"]]
    )
    figures["handler_aws_calls_per_task"] = {
        e: median((sum(r.handler_aws_calls.values()) / args.tasks for r in by_executor[e]), 3)
        for e in ("provider", "ours")
    }
    figures["latency_model"] = "none" if latency is None else latency.to_dict()
    from hybrid_router.lambda_exec.local.config import DEFAULT_THROTTLE_RETRY_S

    first, most = DEFAULT_THROTTLE_RETRY_S  # the local Lambda service's, as this benchmark starts it
    figures["lambda_async_queue"] = (
        f"an event that finds the function at its concurrency limit is tried again after {first:g} s, doubling"
        f" to {most:g} s (AWS's documented interval)"
    )
    figures.update(
        {
            "tasks": args.tasks,
            "task_seconds": args.task_seconds,
            "rounds": args.rounds,
            "order": "alternating (forwards, then backwards)",
            "core_parallelism": CORE_PARALLELISM,
            "function_concurrency": args.concurrency,
            "local_workers": args.local_workers,
            "scheduler_idle_sleep_time": args.idle_sleep,
            "database": args.database,
            "load_average_max": max((max(r.load_average) for r in runs), default=None),
            "machine": describe_machine(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    return figures


def _median_counts(counts: list[dict[str, int]]) -> dict[str, float]:
    operations = sorted({op for c in counts for op in c})
    return {op: statistics.median(c.get(op, 0) for c in counts) for op in operations} if counts else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=200, help="mapped tasks in the measured DAG")
    parser.add_argument("--task-seconds", type=float, default=1.0, help="how long each task sleeps")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the order alternates between them")
    parser.add_argument("--handlers", default=",".join(HANDLERS), help="full, api_only or both")
    parser.add_argument("--executors", default=",".join(EXECUTORS))
    parser.add_argument("--concurrency", type=int, default=16, help="each function's reserved concurrency")
    parser.add_argument(
        "--local-workers", type=int, default=16, help="LocalExecutor workers (bare and child)"
    )
    parser.add_argument(
        "--idle-sleep", type=float, default=AIRFLOW_DEFAULT_IDLE_SLEEP_S, help="scheduler_idle_sleep_time"
    )
    parser.add_argument(
        "--warmup-tasks", type=int, default=32, help="tasks of each function's warm-up run (0: none)"
    )
    parser.add_argument("--no-latency", action="store_true", help="without the AWS-like latency model")
    parser.add_argument(
        "--database",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="Airflow's metadata database (SQLite locks up under 32 task runners at once: the router's runs)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="give up on a run after this long")
    parser.add_argument("--keep", action="store_true", help="keep the stack's logs after a successful run")
    args = parser.parse_args(argv)
    handlers = [h for h in args.handlers.split(",") if h]
    executors = [e for e in args.executors.split(",") if e]
    unknown = sorted(set(handlers) - set(HANDLERS)) + sorted(set(executors) - set(EXECUTORS))
    if unknown:
        parser.error(f"unknown handler or executor: {unknown}")
    latency = None if args.no_latency else AWS_LIKE

    print(machine_line())
    print(f"latency model: {'none' if latency is None else latency.describe()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runs: list[Run] = []
    # Kept when a run fails or with --keep: the logs of every process are there.
    root = Path(tempfile.mkdtemp(prefix="scheduler-dispatch-"))
    with bench_stack(root, args, latency) as bench:
        one_round = plan(executors, handlers)
        if args.warmup_tasks:
            for executor, handler in one_round:
                if executor in ("provider", "ours"):
                    # A failed warm-up task still warmed its sandbox (a cold one imports Airflow meanwhile).
                    warm = measure(bench, executor, handler, 0, WARMUP_DAG_ID, warm_up=True)
                    print(f"warm-up {executor} ({handler}): {warm.wall_s:.1f} s", flush=True)
        for number in range(1, args.rounds + 1):
            ordered = one_round if number % 2 else list(reversed(one_round))
            for executor, handler in ordered:
                run = measure(bench, executor, handler, number, DAG_ID)
                runs.append(run)
                print(run.line(), flush=True)
    if args.keep:
        print(f"logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    lines = []
    for handler in handlers:
        mine = [r for r in runs if r.handler in (handler, None)]
        figures = summary(f"{handler}_handler", mine, args, latency)
        lines.append(figures)
        shares = [
            f"{e}: stack {figures[f'stack_cpu_share_{e}']:.0%} of both cores (task bodies"
            f" {figures[f'task_body_cpu_s_{e}']} CPU-s in {figures[f'wall_s_{e}']} s), machine"
            f" {figures[f'machine_busy_share_{e}']:.0%} busy"
            for e in executors
            if figures.get(f"stack_cpu_share_{e}") is not None
        ]
        print(f"{handler} handler, medians: " + "; ".join(shares))
    for figures in lines:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

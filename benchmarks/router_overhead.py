"""What the router costs: one DAG of N no-op tasks through a real scheduler, bare LocalExecutor vs the router.

(a) ``[core] executor = LocalExecutor``; (b) the RoutingExecutor with a policy of ``--rules`` rules (50 by
default) whose last one sends every task to one LocalExecutor child, so each decision walks the whole list. Both
run ``--parallelism`` worker processes; same API server and DAG processor; only the scheduler is restarted with
the other executor. The order alternates by round (bare, router, then router, bare: ABBA) so that drift of the
machine and warm caches favour neither. The time of a run is the DAG run's own ``end_date - start_date``
(scheduler start-up is not in it).

Each round runs both at the dev stack's ``scheduler_idle_sleep_time`` (0.2 s) and, unless
``--no-default-idle-sleep``, again at Airflow's default (1 s), which is what a new user runs: the scheduler then
sleeps that long whenever a loop found nothing to do, and the router's extra heartbeat-bound steps could show.

``[core] parallelism`` caps what the scheduler hands out by the executor's ``slots_occupied``. LocalExecutor
never fills its ``running`` set in Airflow 3.3.2, so that cap never binds it and it keeps an unbounded backlog in
its worker queue; the router counts its running tasks honestly (prefetched ones included), so it is given
``--router-core-parallelism`` (default three times the workers: the running tasks, as many prefetched into the
child's queue, and the router's own one-wave queue). Pass ``--router-core-parallelism`` equal to
``--parallelism`` to measure the router with no queue at all.

    python benchmarks/router_overhead.py [--pairs 5] [--tasks 50] [--parallelism 8] [--router-core-parallelism 24]
                                         [--rules 50] [--task-seconds 0] [--prefetch N] [--also-without-prefetch]
                                         [--no-default-idle-sleep]

Without prefetch the router frees a child's slot when it sees the child's event, at the next scheduler
heartbeat, while LocalExecutor's workers take the next task from their queue at once: with no-op tasks that gap
(up to one scheduler loop per task) is most of what is measured. The router's ``prefetch`` (by default equal to
``max_concurrency`` for a LocalExecutor child) lets the child hold that many more tasks in its own queue.
``--prefetch`` sets it in the policy; ``--also-without-prefetch`` adds a third run per round, the router with
``prefetch: 0``, to show what prefetch buys.

The last line is JSON: ``overhead_ratio`` is median(b) / median(a) at the dev stack's idle sleep, the target
<= 1.10; ``overhead_ratio_default_idle_sleep`` the same at Airflow's default. ``best_ratio`` (fastest b /
fastest a) is the figure least disturbed by other load on a shared machine. The local stack adds no AWS latency
here: every task runs on LocalExecutor, so the figures are the router's own cost.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

# devtools/ lives in the checkout, not the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.devstack import AirflowStack, StackError, wait_until
from devtools.machine import describe_machine, machine_line

ROUTER = "hybrid_router.router.RoutingExecutor"
DAG_ID = "router_overhead"

DAG = """
import pendulum
from airflow.sdk import dag, task


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, max_active_tasks={tasks})
def router_overhead():
    @task
    def noop(i):
        if {task_seconds}:
            import time

            time.sleep({task_seconds})
        return i

    for i in range({tasks}):
        noop.override(task_id=f"noop_{{i:03d}}")(i)


router_overhead()
"""

POLICY = """
version: 1
executors:
  local: {{class: LocalExecutor, max_concurrency: {parallelism}{prefetch}}}
defaults: {{expected_duration: 1m, memory_mb: 512, run_on: local}}
rules:
{rules}  - name: everything
    run_on: local
"""
# Rules a real policy might hold for other teams' DAGs: each names a condition the benchmark's tasks fail, a
# different kind in turn, so the engine evaluates every kind before the last rule takes the task.
_MISSED_CONDITIONS = (
    "dag_id: ['team_{i}_*']",
    "task_id: ['extract_{i}_*', 'load_{i}_*']",
    "queue: [queue_{i}]",
    "operator: [Operator{i}]",
    "pool: [pool_{i}]",
)


def policy_text(parallelism: int, prefetch: str, rules: int) -> str:
    """A policy of ``rules`` rules: ``rules - 1`` that the benchmark's tasks miss, then one that takes all."""
    missed = "".join(
        f"  - name: team {i}\n    if: {{{_MISSED_CONDITIONS[i % len(_MISSED_CONDITIONS)].format(i=i)}}}\n"
        "    run_on: local\n"
        for i in range(max(rules - 1, 0))
    )
    return textwrap.dedent(POLICY).format(parallelism=parallelism, prefetch=prefetch, rules=missed)


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def use_executor(
    stack: AirflowStack, executor: str, core_parallelism: int, policy: Path, idle_sleep: float
) -> None:
    """Restart only the scheduler, with another ``[core] executor``, ``[core] parallelism``, policy and
    ``scheduler_idle_sleep_time``."""
    stack.kill_scheduler(signal.SIGTERM, group=True)
    running_jobs = "FROM job WHERE job_type = 'SchedulerJob' AND state = 'running'"
    # SQLite allows one scheduler: wait until the old one has closed its job.
    try:
        wait_until(
            lambda: stack.sql(f"SELECT count(*) {running_jobs}") == [(0,)],
            # LocalExecutor's end() waits for its workers' supervisors, which can take a while on a loaded
            # machine.
            120,
            "the previous scheduler to stop",
        )
    except StackError:
        # Seen once on a loaded machine: end() stuck on a worker. That scheduler schedules nothing any more
        # (it is shutting down) and its process group is swept when the stack stops; close its job so that
        # the measurements go on.
        print("previous scheduler did not stop within 120 s; closing its job and going on", flush=True)
        stack.sql(f"UPDATE job SET state = 'failed' WHERE id IN (SELECT id {running_jobs})")
    stack.env["AIRFLOW__CORE__EXECUTOR"] = executor
    stack.env["AIRFLOW__CORE__PARALLELISM"] = str(core_parallelism)
    stack.env["AIRFLOW__HYBRID_ROUTER__POLICY_FILE"] = str(policy)
    stack.env["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] = str(idle_sleep)
    stack.start_scheduler()


def timed_run(stack: AirflowStack, timeout: float) -> float:
    run_id = stack.trigger(DAG_ID)
    state = stack.wait_run(DAG_ID, run_id, timeout=timeout)
    if state != "success":
        raise SystemExit(f"run {run_id} ended {state}; see {stack.log_dir}")
    run = stack.dag_run(DAG_ID, run_id)
    return _seconds(run["start_date"], run["end_date"])


DEV_IDLE_SLEEP_S = 0.2  # the dev stack's scheduler_idle_sleep_time
AIRFLOW_DEFAULT_IDLE_SLEEP_S = 1.0


def _ratios(label: str, bare: list[float], routed: list[float]) -> dict[str, object]:
    """Print both sides' runs and return their ratios: medians, per round, and fastest runs."""
    bare_median, routed_median = statistics.median(bare), statistics.median(routed)
    print(f"{label}: bare LocalExecutor median {bare_median:.2f} s {[round(s, 2) for s in bare]}")
    print(f"{label}: router -> Local    median {routed_median:.2f} s {[round(s, 2) for s in routed]}")
    # Each round's own ratio: the spread says how much the shared machine moved between runs.
    round_ratios = [round(r / b, 3) for b, r in zip(bare, routed, strict=True)]
    best_ratio = round(min(routed) / min(bare), 3)
    print(f"{label}: router / bare per round {round_ratios}, best runs {best_ratio}")
    return {
        "overhead_ratio": round(routed_median / bare_median, 3),
        "pair_ratios": round_ratios,
        "best_ratio": best_ratio,
        "bare_s": bare,
        "router_s": routed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="rounds; the order alternates between them")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--parallelism", type=int, default=8)
    parser.add_argument("--router-core-parallelism", type=int, default=None)
    parser.add_argument(
        "--rules", type=int, default=50, help="rules in the router's policy (the last matches)"
    )
    parser.add_argument(
        "--task-seconds", type=float, default=0, help="how long each task sleeps (0: a no-op task)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="the local child's prefetch (default: the router's default)",
    )
    parser.add_argument(
        "--also-without-prefetch", action="store_true", help="add a run of the router with prefetch: 0"
    )
    parser.add_argument(
        "--no-default-idle-sleep",
        action="store_true",
        help="skip the runs at Airflow's default scheduler_idle_sleep_time (1 s)",
    )
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    router_core = args.router_core_parallelism or 3 * args.parallelism

    print(machine_line())
    print("latency model: none (LocalExecutor children only; no AWS call is made)")
    with tempfile.TemporaryDirectory(prefix="router-overhead-") as tmp:
        root = Path(tmp)
        dags = root / "dags"
        dags.mkdir()
        (dags / "overhead.py").write_text(
            textwrap.dedent(DAG.format(tasks=args.tasks, task_seconds=args.task_seconds))
        )
        policy = root / "policy.yaml"
        prefetch = "" if args.prefetch is None else f", prefetch: {args.prefetch}"
        policy.write_text(policy_text(args.parallelism, prefetch, args.rules))
        policy_no_prefetch = root / "policy-no-prefetch.yaml"
        policy_no_prefetch.write_text(policy_text(args.parallelism, ", prefetch: 0", args.rules))
        stack = AirflowStack(
            root / "airflow",
            dags,
            executor="LocalExecutor",
            parallelism=args.parallelism,
            config={
                "hybrid_router": {"policy_file": policy},
                "scheduler": {"max_tis_per_query": 0, "scheduler_idle_sleep_time": DEV_IDLE_SLEEP_S},
            },
        )
        idle_sleeps = [DEV_IDLE_SLEEP_S] + (
            [] if args.no_default_idle_sleep else [AIRFLOW_DEFAULT_IDLE_SLEEP_S]
        )
        results: dict[tuple[str, float], list[float]] = {}
        variants = [
            ("bare", "LocalExecutor", args.parallelism, policy),
            ("router", ROUTER, router_core, policy),
        ]
        if args.also_without_prefetch:
            variants.append(("router, prefetch 0", ROUTER, router_core, policy_no_prefetch))
        with stack:
            timed_run(stack, args.timeout)  # warm-up: DAG parsed, files cached, first-run costs paid
            for pair in range(args.pairs):
                # ABBA: odd rounds run the variants in reverse order.
                ordered = variants if pair % 2 == 0 else list(reversed(variants))
                for idle_sleep in idle_sleeps:
                    for label, executor, core_parallelism, policy_file in ordered:
                        use_executor(stack, executor, core_parallelism, policy_file, idle_sleep)
                        seconds = timed_run(stack, args.timeout)
                        results.setdefault((label, idle_sleep), []).append(seconds)
                        print(
                            f"round {pair + 1} idle sleep {idle_sleep:3.1f} s {label:18s} {seconds:6.2f} s",
                            flush=True,
                        )
        figures = _ratios(
            f"idle sleep {DEV_IDLE_SLEEP_S} s",
            results["bare", DEV_IDLE_SLEEP_S],
            results["router", DEV_IDLE_SLEEP_S],
        )
        extra: dict[str, object] = {}
        if not args.no_default_idle_sleep:
            default = _ratios(
                f"idle sleep {AIRFLOW_DEFAULT_IDLE_SLEEP_S} s (Airflow's default)",
                results["bare", AIRFLOW_DEFAULT_IDLE_SLEEP_S],
                results["router", AIRFLOW_DEFAULT_IDLE_SLEEP_S],
            )
            extra.update({f"{key}_default_idle_sleep": value for key, value in default.items()})
        if args.also_without_prefetch:
            no_prefetch = results["router, prefetch 0", DEV_IDLE_SLEEP_S]
            bare = results["bare", DEV_IDLE_SLEEP_S]
            print(f"router -> Local, no prefetch: {[round(s, 2) for s in no_prefetch]}")
            extra.update(
                {
                    "overhead_ratio_prefetch_0": round(
                        statistics.median(no_prefetch) / statistics.median(bare), 3
                    ),
                    "best_ratio_prefetch_0": round(min(no_prefetch) / min(bare), 3),
                    "router_prefetch_0_s": no_prefetch,
                }
            )
        print(
            json.dumps(
                {
                    **figures,
                    **extra,
                    "rules": args.rules,
                    "order": "ABBA",
                    "idle_sleep_s": DEV_IDLE_SLEEP_S,
                    "prefetch": args.prefetch,
                    "tasks": args.tasks,
                    "task_seconds": args.task_seconds,
                    "parallelism": args.parallelism,
                    "router_core_parallelism": router_core,
                    "pairs": args.pairs,
                    "latency_model": "none",
                    "machine": describe_machine(),
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A scheduler lost mid-flight: hundreds of tasks across Lambda and Local on two schedulers, one killed with -9.

A real Airflow on PostgreSQL with two ``airflow scheduler`` processes, each with the RoutingExecutor: every task
goes to a LambdaExecutor child (the local Lambda service running the project's handler, moto's SQS) and
overflows to a LocalExecutor child when Lambda has no room; past both it waits in the router. One DAG maps
``--tasks`` tasks of 2-10 s whose bodies append a start and an end line to a journal (``devtools/run_journal.py``).
Once half of them are done, one scheduler that has tasks on Lambda and tasks waiting in its router is killed with
SIGKILL (its main process, as a crash would; its LocalExecutor workers are orphaned) and not restarted. The other
one adopts its tasks through Airflow's orphan adoption (``[scheduler] scheduler_health_check_threshold`` and
``orphaned_tasks_check_interval``). Every process runs with the honest-speed latency model (``devtools/latency.py``).

What is measured, from the journal, the metadata database, the schedulers' logs and the local Lambda service:

- ``lost``, ``double_runs``, ``retries_spent`` (tries beyond the first), not counting ``local_exception``: the
  tries on the dead scheduler's LocalExecutor (running or prefetched), which Airflow's LocalExecutor cannot adopt
  either: the survivor resets them and they run again as a new try. ``local_exception_of_the_killed`` are those of
  the killed scheduler; the others belong to a live scheduler that stalled past the health threshold and was taken
  for dead (``schedulers_taken_for_dead_before_kill``: Airflow's HA adopts from it all the same).
  ``resets_not_on_local`` counts reset tries anywhere else (target 0);
- ``on_lambda_at_kill``, ``on_local_at_kill``, ``waiting_at_kill``: the dead scheduler's tasks just after the kill;
  ``adopted``: those the survivor's router took over (the "Adopted N of M" lines of its log);
- ``recovery_s``: from the kill to the last adopted task reported again by the survivor (the first event its
  executor gave the scheduler for it: the result of a run on Lambda, or the re-queueing of a task that waited in
  the dead router); ``adopted_waiting_running_s``: from the kill to the last of those waiting tasks running;
- ``max_lambda_in_flight`` against ``lambda_concurrency_limit`` (the function's reserved concurrency) and
  ``max_events_waiting_in_lambda``: events Lambda accepted that waited for a concurrency slot while a live
  scheduler's Local had a free slot (sampled every half second from the service's stats and the database);
- ``result_latency_p99_s``: from the handler's final send to the result in the owning scheduler's executor (the
  executor's debug line for it), beside ``result_latency_p99_s_one_scheduler``: the same workload on one
  scheduler with the same capacity, no kill (skipped with ``--baseline-tasks 0``).

    python benchmarks/ha_failover.py [--tasks 300] [--baseline-tasks 300] [--function-concurrency 8]
                                     [--local-per-router 4] [--health-threshold 10] [--orphan-interval 15]

It prints the machine and the latency model first; the last line is one JSON object with the figures above.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# devtools/ lives in the checkout, not the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.devstack import AirflowStack, StackError, wait_until
from devtools.lambda_settings import airflow_with_local_lambda
from devtools.latency import AWS_LIKE
from devtools.machine import machine_line
from devtools.postgres import PostgresServer, set_database_options
from devtools.run_journal import JOURNAL_DAG_HELPERS, check_journal, read_journal
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService
from hybrid_router.router.adoption import held_by_router
from hybrid_router.router.external_id import parse_external_id

ROUTER = "hybrid_router.router.RoutingExecutor"
DAG_ID = "ha_failover"
TASK_ID = "work"
FUNCTION = "airflow-task"
SECRET = "ha-failover-secret"
# A cold sandbox imports Airflow's task runner (4-9 s on a loaded 2-core machine) before a body of up to 10 s.
FUNCTION_TIMEOUT_S = 60
SAMPLE_EVERY_S = 0.5
# PostgreSQL's idle_in_transaction_session_timeout, in scheduler health thresholds: the killed scheduler's open
# transaction (kept open by its orphaned LocalExecutor workers, which hold its connection) and its row locks go
# after this; no live scheduler sits that long in a transaction (it would count as dead by then).
IDLE_IN_TRANSACTION_THRESHOLDS = 2

DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

DURATIONS = %(durations)r


# A retry is allowed (5 s later), so a spent one shows as try 2 instead of a failure.
@dag(
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1),
    catchup=False,
    max_active_tasks=%(tasks)d,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=5)},
)
def ha_failover():
    @task
    def work(i):
        journaled_body(DURATIONS[i])

    work.expand(i=list(range(%(tasks)d)))


ha_failover()
"""

POLICY = """
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: {lambda_max}
    # As docs/production.md advises for several schedulers: a task the function has no slot for waits in the
    # router, where a survivor runs it in the same try, not in the Lambda child of a scheduler that may die.
    prefetch: 0
    limits: {{max_duration: 15m, max_memory_mb: 10240}}
  local: {{class: LocalExecutor, max_concurrency: {local_max}}}
defaults: {{expected_duration: 1m, memory_mb: 512, run_on: local}}
settings: {{fallback_mode: same_try, max_fallbacks: 1}}
rules:
  - name: lambda first
    run_on: lambda
    overflow: [local]
    fallback: [local]
"""

TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")
EVENT = re.compile(
    r"Received executor event with state (\w+) for task instance TaskInstanceKey\("
    rf"dag_id='{DAG_ID}', task_id='{TASK_ID}', run_id='[^']*', try_number=(\d+), map_index=(\d+)\)"
)
ADOPTED = re.compile(r"Adopted (\d+) of (\d+) task instances")
MARKED_DEAD = re.compile(r"Marked (\d+) SchedulerJob instances as failed")
FINAL_APPLIED = re.compile(r"Final of dispatch \w+ applied (-?[\d.]+)s after the handler sent it")


@dataclass
class Samples:
    """What the sampler saw: the function's runs and queued events, and whether a live Local had room then."""

    max_in_flight: int = 0
    max_waiting: int = 0
    max_waiting_while_local_had_room: int = 0
    count: int = 0
    # The machine's 1-minute load average: other work on a shared machine shows in every latency.
    loads: list[float] = field(default_factory=list)

    def mean_load(self) -> float | None:
        return round(statistics.mean(self.loads), 1) if self.loads else None


@dataclass
class Outcome:
    wall_s: float
    latencies: list[float]
    figures: dict[str, Any] = field(default_factory=dict)


def log_lines(path: Path) -> Iterator[tuple[float | None, str]]:
    """Each line of a scheduler's log with its time (seconds since the epoch; None for continuation lines)."""
    for line in path.read_text(errors="replace").splitlines():
        match = TIMESTAMP.match(line)
        at = datetime.fromisoformat(match.group(1) + "+00:00").timestamp() if match else None
        yield at, line


def final_latencies(stack: AirflowStack) -> list[float]:
    return [
        float(match.group(1))
        for name in stack.scheduler_names
        for _, line in log_lines(stack.process_log(name))
        if (match := FINAL_APPLIED.search(line))
    ]


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 3)


def task_rows(stack: AirflowStack, run_id: str) -> dict[int, tuple]:
    """map_index -> (state, external id, queued_by_job_id, try_number)."""
    rows = stack.sql(
        "SELECT map_index, state, external_executor_id, queued_by_job_id, try_number FROM task_instance "
        "WHERE dag_id = ? AND run_id = ?",
        (DAG_ID, run_id),
    )
    return {index: rest for index, *rest in rows}


def place(state: str | None, external_id: str | None, try_number: int) -> str | None:
    """Where a queued or running task is for its scheduler: on ``lambda``, on ``local``, or ``waiting`` in the
    router (by the rule the survivor's router adopts by); None when it is neither queued nor running."""
    if state not in ("queued", "running"):
        return None
    parsed = parse_external_id(external_id)
    if held_by_router(parsed, SimpleNamespace(state=state, key=SimpleNamespace(try_number=try_number))):
        return "waiting"
    return parsed.child if parsed is not None and parsed.child in ("lambda", "local") else "other"


def places_by_job(rows: dict[int, tuple]) -> dict[int, dict[str, set[int]]]:
    jobs: dict[int, dict[str, set[int]]] = {}
    for index, (state, external_id, job, try_number) in rows.items():
        where = place(state, external_id, try_number)
        if where is not None and job is not None:
            jobs.setdefault(job, {}).setdefault(where, set()).add(index)
    return jobs


def scheduler_of_job(stack: AirflowStack, job_id: int) -> str:
    """The scheduler process that runs ``job_id`` (it names its job when it queues tasks)."""
    mark = f"scheduler job_id={job_id})"
    for name in stack.scheduler_names:
        if mark in stack.process_log(name).read_text(errors="replace"):
            return name
    raise StackError(f"no scheduler log names job {job_id}")


class Sampler(threading.Thread):
    """Samples the function's in-flight runs and queued events, and each live scheduler's Local in flight."""

    def __init__(self, stack: AirflowStack, service: LocalLambdaService, run_id: str, local_max: int) -> None:
        super().__init__(daemon=True, name="ha-failover-sampler")
        self.stack, self.service, self.run_id, self.local_max = stack, service, run_id, local_max
        self.live_jobs: set[int] = set()
        self.samples = Samples()
        self.stopping = threading.Event()
        self.errors = 0

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_EVERY_S):
            try:
                self._sample()
            except Exception:  # a sample missed (the stack busy or stopping) is not a measurement
                self.errors += 1

    def _sample(self) -> None:
        self.samples.loads.append(os.getloadavg()[0])
        counts = self.service.stats()["functions"][FUNCTION]
        local = dict(
            self.stack.sql(
                "SELECT queued_by_job_id, count(*) FROM task_instance WHERE dag_id = ? AND run_id = ? "
                "AND state IN ('queued', 'running') AND external_executor_id LIKE 'local@%' "
                "GROUP BY queued_by_job_id",
                (DAG_ID, self.run_id),
            )
        )
        local_had_room = any(local.get(job, 0) < self.local_max for job in self.live_jobs)
        samples = self.samples
        samples.count += 1
        samples.max_in_flight = max(samples.max_in_flight, counts["in_flight"])
        samples.max_waiting = max(samples.max_waiting, counts["queued"])
        if local_had_room:
            samples.max_waiting_while_local_had_room = max(
                samples.max_waiting_while_local_had_room, counts["queued"]
            )


def write_dag(root: Path, tasks: int, seed: int) -> Path:
    """The DAG in ``root/dags`` (durations drawn with ``seed``); its journal's path."""
    dags = root / "dags"
    dags.mkdir(parents=True)
    journal = root / "journal.txt"
    journal.touch()
    rng = random.Random(seed)
    durations = [round(rng.uniform(2.0, 10.0), 2) for _ in range(tasks)]
    source = JOURNAL_DAG_HELPERS % {"journal": str(journal)} + DAG % {"durations": durations, "tasks": tasks}
    (dags / "ha_failover.py").write_text(textwrap.dedent(source))
    return journal


@contextmanager
def scenario_stack(
    root: Path, database_url: str, args: argparse.Namespace, *, schedulers: int, local_max: int
) -> Iterator[Any]:
    policy = root / "policy.yaml"
    policy.write_text(
        textwrap.dedent(POLICY.format(lambda_max=args.function_concurrency, local_max=local_max))
    )
    set_database_options(
        database_url,
        idle_in_transaction_session_timeout=f"{IDLE_IN_TRANSACTION_THRESHOLDS * args.health_threshold}s",
    )
    function = FunctionConfig(
        name=FUNCTION,
        memory_mb=512,
        timeout_s=FUNCTION_TIMEOUT_S,
        reserved_concurrency=args.function_concurrency,
        maximum_retry_attempts=0,
    )
    dags = root / "dags"
    with airflow_with_local_lambda(
        root,
        dags,
        executor=ROUTER,
        function=function,
        secret=SECRET,
        config={
            "hybrid_router": {"policy_file": policy},
            "scheduler": {
                "scheduler_health_check_threshold": args.health_threshold,
                "orphaned_tasks_check_interval": args.orphan_interval,
            },
            # The executor's line for each result it applies (the handler's send to the scheduler's buffer).
            "logging": {"namespace_levels": "hybrid_router.lambda_exec.executor=DEBUG"},
        },
        database_url=database_url,
        schedulers=schedulers,
        env=AWS_LIKE.process_env(),
    ) as lambda_stack:
        lambda_stack.service.set_delivery_faults(settings=AWS_LIKE.lambda_faults())
        lambda_stack.airflow.wait_dag(DAG_ID, timeout=300)
        yield lambda_stack


def run_failover(root: Path, database_url: str, args: argparse.Namespace) -> Outcome:
    """Two schedulers; once half the tasks are done, kill one that has tasks on Lambda and waiting; measure."""
    journal = write_dag(root, args.tasks, args.seed)
    with scenario_stack(
        root, database_url, args, schedulers=2, local_max=args.local_per_router
    ) as lambda_stack:
        stack, service = lambda_stack.airflow, lambda_stack.service
        began = time.monotonic()
        run_id = stack.trigger(DAG_ID)
        sampler = Sampler(stack, service, run_id, args.local_per_router)
        sampler.live_jobs = {
            job
            for (job,) in stack.sql(
                "SELECT id FROM job WHERE job_type = 'SchedulerJob' AND state = 'running'"
            )
        }
        sampler.start()
        victim, killed_at, at_kill = kill_in_the_middle(stack, run_id, args)
        sampler.live_jobs.discard(victim)
        victim_name = scheduler_of_job(stack, victim)
        print(
            f"killed {victim_name} (job {victim}) at {time.monotonic() - began:.1f} s: "
            + ", ".join(f"{len(v)} {k}" for k, v in sorted(at_kill.items())),
            flush=True,
        )
        state = stack.wait_run(DAG_ID, run_id, timeout=args.timeout)
        wall_s = time.monotonic() - began
        sampler.stopping.set()
        sampler.join()
        print(f"DAG run ended {state} after {wall_s:.1f} s ({sampler.samples.count} samples)", flush=True)
        final = task_rows(stack, run_id)
        resets = stack.sql(
            "SELECT map_index, try_number, external_executor_id, queued_by_job_id FROM task_instance_history "
            "WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, run_id),
        )
        (survivor_name,) = [name for name in stack.scheduler_names if name != victim_name]
        logs = {name: list(log_lines(stack.process_log(name))) for name in stack.scheduler_names}
        survivor_log = logs[survivor_name]
        latencies = final_latencies(stack)

    # Every reset try must have been on the LocalExecutor of a scheduler taken for dead: the killed one, or one
    # that stalled past the health threshold (Airflow's HA adopts from it all the same).
    local_exception = {
        index
        for index, _, external_id, _ in resets
        if (parsed := parse_external_id(external_id)) and parsed.child == "local"
    }
    at_kill_local = {
        index for index, _, _, job in resets if index in local_exception and job == victim
    } & at_kill.get("local", set())
    taken_for_dead = sum(
        int(m.group(1))
        for lines in logs.values()
        for at, line in lines
        if at and at < killed_at and (m := MARKED_DEAD.search(line))
    )
    report = check_journal(read_journal(journal), [(DAG_ID, TASK_ID, i) for i in range(args.tasks)])
    others = set(range(args.tasks)) - local_exception
    lost = {task[2] for task in report.lost} | {
        i for i in range(args.tasks) if final.get(i, (None,))[0] != "success"
    }
    double = {task[2] for task in report.double_runs} | {attempt[2] for attempt in report.overlaps}
    retries_spent = sum(max(0, final[i][3] - 1) for i in others if i in final)

    # Adopted: the dead scheduler's tasks that the survivor's job holds at the same try.
    in_flight_at_kill = set().union(*at_kill.values()) if at_kill else set()
    adopted_keys = {
        i for i in in_flight_at_kill - local_exception if final[i][2] != victim and final[i][3] == 1
    }
    adoption_lines = [
        (at, m) for at, line in survivor_log if at and at >= killed_at and (m := ADOPTED.search(line))
    ]
    adopted = sum(int(m.group(1)) for _, m in adoption_lines)
    first_event: dict[int, float] = {}
    first_running: dict[int, float] = {}
    for at, line in survivor_log:
        if at is None or at < killed_at or not (match := EVENT.search(line)):
            continue
        state_name, index = match.group(1), int(match.group(3))
        first_event.setdefault(index, at)
        if state_name in ("running", "success", "failed"):
            first_running.setdefault(index, at)
    reported = [first_event.get(i) for i in adopted_keys]
    waiting_running = [first_running.get(i) for i in adopted_keys & at_kill.get("waiting", set())]
    samples = sampler.samples
    figures = {
        "tasks": args.tasks,
        "lost": len(lost),
        "double_runs": len(double - local_exception),
        "retries_spent": retries_spent,
        "local_exception": len(local_exception),
        "local_exception_of_the_killed": len(at_kill_local),
        "resets_not_on_local": len({index for index, *_ in resets} - local_exception),
        "schedulers_taken_for_dead_before_kill": taken_for_dead,
        "on_lambda_at_kill": len(at_kill.get("lambda", ())),
        "on_local_at_kill": len(at_kill.get("local", ())),
        "waiting_at_kill": len(at_kill.get("waiting", ())),
        "adopted": adopted,
        "adopted_tasks_seen": len(adopted_keys),
        "recovery_s": _since(killed_at, reported),
        "adoption_s": round(adoption_lines[0][0] - killed_at, 1) if adoption_lines else None,
        "adopted_waiting_running_s": _since(killed_at, waiting_running),
        "health_threshold_s": args.health_threshold,
        "orphan_check_interval_s": args.orphan_interval,
        "idle_in_transaction_timeout_s": IDLE_IN_TRANSACTION_THRESHOLDS * args.health_threshold,
        "max_lambda_in_flight": samples.max_in_flight,
        "lambda_concurrency_limit": args.function_concurrency,
        "max_events_waiting_in_lambda": samples.max_waiting_while_local_had_room,
        "max_events_waiting_in_lambda_any": samples.max_waiting,
        "load_avg_1m": samples.mean_load(),
        "state": state,
        "wall_s": round(wall_s, 1),
    }
    return Outcome(wall_s, latencies, figures)


def _since(start: float, times: list[float | None]) -> float | None:
    """Seconds from ``start`` to the last of ``times``; None if any of them never came."""
    if not times or any(t is None for t in times):
        return None
    return round(max(times) - start, 1)


def kill_in_the_middle(stack: AirflowStack, run_id: str, args: argparse.Namespace) -> tuple[int, float, dict]:
    """Once half the tasks are done, SIGKILL a scheduler with tasks on Lambda and waiting in its router (and on
    Local, when one has all three); returns its job id, the kill's wall time and its tasks just after the kill."""

    def candidate() -> int | None:
        rows = task_rows(stack, run_id)
        done = sum(1 for state, *_ in rows.values() if state == "success")
        if done < args.tasks // 2:
            return None
        jobs = places_by_job(rows)
        ready = [job for job, where in jobs.items() if where.get("lambda") and where.get("waiting")]
        everywhere = [job for job in ready if jobs[job].get("local")]
        return (everywhere or ready or [None])[0]

    victim = wait_until(
        candidate, args.timeout, "a scheduler with tasks on Lambda and waiting", interval=0.25
    )
    stack.kill_scheduler(name=scheduler_of_job(stack, victim))
    killed_at = time.time()
    # Read after the kill: the dead scheduler writes nothing more, and this is what the survivor will find.
    at_kill = places_by_job(task_rows(stack, run_id)).get(victim, {})
    return victim, killed_at, at_kill


def run_one_scheduler(root: Path, database_url: str, args: argparse.Namespace) -> Outcome:
    """The same workload and capacity on one scheduler, no kill: the result latency to compare with."""
    write_dag(root, args.baseline_tasks, args.seed)
    with scenario_stack(
        root, database_url, args, schedulers=1, local_max=2 * args.local_per_router
    ) as lambda_stack:
        stack = lambda_stack.airflow
        began = time.monotonic()
        run_id = stack.trigger(DAG_ID)
        sampler = Sampler(stack, lambda_stack.service, run_id, 2 * args.local_per_router)
        sampler.start()
        state = stack.wait_run(DAG_ID, run_id, timeout=args.timeout)
        wall_s = time.monotonic() - began
        sampler.stopping.set()
        sampler.join()
        print(f"one scheduler: DAG run ended {state} after {wall_s:.1f} s", flush=True)
        figures = {"state": state, "load_avg_1m": sampler.samples.mean_load()}
        return Outcome(wall_s, final_latencies(stack), figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--baseline-tasks", type=int, default=300, help="the one-scheduler run (0: skip it)")
    parser.add_argument(
        "--function-concurrency", type=int, default=8, help="the function's reserved concurrency"
    )
    parser.add_argument("--local-per-router", type=int, default=4, help="each router's LocalExecutor slots")
    parser.add_argument(
        "--health-threshold", type=int, default=10, help="[scheduler] scheduler_health_check_threshold"
    )
    parser.add_argument(
        "--orphan-interval", type=int, default=15, help="[scheduler] orphaned_tasks_check_interval"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, journal)")
    args = parser.parse_args(argv)

    print(machine_line(), flush=True)
    print(f"latency model: {AWS_LIKE.describe()}", flush=True)
    print(
        f"workload: {args.tasks} mapped tasks of 2-10 s; two schedulers on PostgreSQL, each router: lambda "
        f"(max {args.function_concurrency}, function reserved concurrency {args.function_concurrency}) with "
        f"overflow and fallback local (max {args.local_per_router}); scheduler_health_check_threshold "
        f"{args.health_threshold} s, orphaned_tasks_check_interval {args.orphan_interval} s",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="ha-failover-"))
    ok = False
    try:
        with PostgresServer() as postgres:
            failover = run_failover(root / "failover", postgres.create_database("failover"), args)
            baseline = None
            if args.baseline_tasks:
                baseline = run_one_scheduler(root / "one", postgres.create_database("one_scheduler"), args)
        figures = failover.figures
        figures["result_latency_p50_s"] = percentile(failover.latencies, 0.5)
        figures["result_latency_p99_s"] = percentile(failover.latencies, 0.99)
        figures["results_measured"] = len(failover.latencies)
        if baseline is not None:
            figures["result_latency_p50_s_one_scheduler"] = percentile(baseline.latencies, 0.5)
            figures["result_latency_p99_s_one_scheduler"] = percentile(baseline.latencies, 0.99)
            figures["results_measured_one_scheduler"] = len(baseline.latencies)
            figures["wall_s_one_scheduler"] = round(baseline.wall_s, 1)
            figures["load_avg_1m_one_scheduler"] = baseline.figures["load_avg_1m"]
            one = figures["result_latency_p99_s_one_scheduler"]
            two = figures["result_latency_p99_s"]
            figures["result_latency_p99_ratio"] = round(two / one, 2) if one and two is not None else None
        ok = figures["lost"] == figures["double_runs"] == figures["retries_spent"] == 0
    finally:
        if args.keep or not ok:
            print(f"run folder kept: {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Routing records as the router writes them, in bulk: for the Routing page's benchmark and its auth tests.

Each task instance's rows come from the router's own code: the policy's decision (``examples/policy.yaml``
unless another is given), the notices of ``router/audit.py`` (routed, overflow, fallback, fallbacks exhausted,
next-try fallback, route error) recorded through ``AuditLog.record``, and the ``run_finished`` row of each run
built as ``measured_runs`` builds it. Only the write differs: one bulk INSERT for them all, where the router
adds ORM rows a heartbeat at a time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from hybrid_router.child_protocol import InfrastructureFailure, RunMeasurement
from hybrid_router.router import audit
from hybrid_router.router.fallback import ExhaustedCause, FallbacksExhausted, NextTryRoute
from hybrid_router.router.measured_runs import _row as run_finished_row
from hybrid_router.router.policy import Policy, TaskFacts, load_policy

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

EXAMPLE_POLICY = Path(__file__).resolve().parent.parent / "examples" / "policy.yaml"
BUNDLE = "dags-folder"
# How often each kind of task instance story happens (the rest: routed by the policy, ran, finished).
OVERFLOW = 0.08  # the first choice had no free slot
DIED = 0.06  # the run died of an infrastructure failure (then a fallback, or none left)
NEXT_TRY = 0.02  # ... under fallback mode next_try: this try fails, the next one goes elsewhere
ROUTE_ERROR = 0.005
TASK_FAILED = 0.04  # the task's own code failed: no fallback, Airflow's retries apply
DEATHS = ("out_of_memory", "timeout", "runtime_crash", "throttled")
MAX_FALLBACKS = 2


@dataclass(frozen=True)
class _Task:
    dag_id: str
    task_id: str
    queue: str | None
    duration_s: float
    memory_mb: int


def _tasks(dag_ids: Sequence[str], tasks_per_dag: int, rng: random.Random) -> list[_Task]:
    tasks = []
    for dag_id in dag_ids:
        for number in range(tasks_per_dag):
            tasks.append(
                _Task(
                    dag_id,
                    f"task_{number:02d}",
                    "lambda" if rng.random() < 0.1 else None,
                    rng.choice((20, 45, 90, 240, 600, 1500, 3600)),
                    rng.choice((256, 512, 512, 1024, 2048, 4096)),
                )
            )
    return tasks


def _record(event: str, key: Any, at: datetime, extra: dict[str, Any]) -> dict[str, Any]:
    """One ``log`` row as ``AuditLog.record`` builds it, as a dict of its columns, dated ``at``."""
    from airflow.models import Log

    log = audit.AuditLog()
    log.record(event, key, **extra)
    (row,) = log._pending
    row.dttm = at
    return {column.key: getattr(row, column.key) for column in Log.__table__.columns if column.key != "id"}


def _notice(notice: audit.Notice, key: Any, at: datetime) -> dict[str, Any]:
    assert notice.event is not None
    return _record(notice.event, key, at, dict(notice.extra))


def _finished(
    key: Any, at: datetime, executor: str, outcome: str, duration_s: float, memory_mb: int, rng: random.Random
) -> dict[str, Any]:
    on_lambda = executor.startswith("lambda")
    size = 3008 if executor == "lambda_3g" else 512 if on_lambda else None
    measured = RunMeasurement(
        memory_size_mb=size,
        peak_memory_mb=None
        if outcome == "out_of_memory" or not on_lambda
        else int(memory_mb * rng.uniform(0.4, 0.9)),
        duration_ms=None if outcome in DEATHS else duration_s * 1000 * rng.uniform(0.5, 1.5),
        billed_duration_ms=None if outcome in DEATHS or not on_lambda else int(duration_s * 1000) + 1,
    )
    child = SimpleNamespace(name=executor, max_memory_mb=size)
    return _record(audit.EVENT_RUN_FINISHED, key, at, run_finished_row(child, outcome, measured))  # type: ignore[arg-type]


def _story(task: _Task, policy: Policy, run_id: str, start: datetime, rng: random.Random) -> Iterator[dict]:
    """The rows of one task instance, in the order the router writes them."""
    from airflow.models.taskinstancekey import TaskInstanceKey

    key = TaskInstanceKey(task.dag_id, task.task_id, run_id, 1, -1)
    facts = TaskFacts(
        task.dag_id,
        task.task_id,
        queue=task.queue,
        expected_duration_s=task.duration_s,
        duration_source="history",
        memory_mb=task.memory_mb,
        memory_source="learned",
    )
    decision = policy.decide(facts)
    at = start + timedelta(seconds=rng.uniform(0, 60))
    roll = rng.random()
    if roll < ROUTE_ERROR:
        yield _notice(audit.route_error(ValueError("executor 'lambda' is not started")), key, at)
        return
    target = decision.executor
    if decision.overflow and rng.random() < OVERFLOW:
        target = decision.overflow[0]
    yield _notice(audit.routed(decision, target, first_choice=decision.executor), key, at)
    ran_s = task.duration_s * rng.uniform(0.5, 1.5)
    at += timedelta(seconds=ran_s)
    roll = rng.random()
    if roll >= DIED + NEXT_TRY:
        outcome = "failed" if rng.random() < TASK_FAILED else "success"
        yield _finished(key, at, target, outcome, task.duration_s, task.memory_mb, rng)
        return
    reason = rng.choice(DEATHS)
    failure = InfrastructureFailure(reason, f"{reason} after {ran_s:.0f} s", target)
    yield _finished(key, at, target, reason, task.duration_s, task.memory_mb, rng)
    candidates = [name for name in decision.fallback_for(reason) if name != target]
    at += timedelta(seconds=rng.uniform(0.1, 2))
    if roll < DIED and candidates and rng.random() < 0.85:
        fallback = candidates[0]
        yield _notice(
            audit.fallback_dispatched(
                decision, fallback, failure, failed_on=target, waited_s=rng.uniform(0, 3)
            ),
            key,
            at,
        )
        at += timedelta(seconds=task.duration_s * rng.uniform(0.5, 1.5))
        yield _finished(key, at, fallback, "success", task.duration_s, task.memory_mb, rng)
    elif roll < DIED or not candidates:
        cause = ExhaustedCause.MAX_FALLBACKS_REACHED if candidates else ExhaustedCause.NO_FALLBACK_LEFT
        exhausted = FallbacksExhausted(cause, MAX_FALLBACKS)
        yield _notice(audit.fallback_exhausted(target, failure, exhausted), key, at)
    else:
        route = NextTryRoute(candidates[0], tuple(candidates[1:]), target, reason)
        yield _notice(audit.next_try_routed(route), key, at)
        retry = TaskInstanceKey(task.dag_id, task.task_id, run_id, 2, -1)
        at += timedelta(minutes=5)
        notice = audit.routed_next_try(
            decision, route.executor, first_choice=decision.executor, failed_on=target
        )
        yield _notice(notice, retry, at)
        at += timedelta(seconds=task.duration_s * rng.uniform(0.5, 1.5))
        yield _finished(retry, at, route.executor, "success", task.duration_s, task.memory_mb, rng)


def routing_rows(
    count: int,
    dag_ids: Sequence[str],
    *,
    tasks_per_dag: int = 20,
    days: float = 7,
    now: datetime | None = None,
    seed: int = 1,
    policy: Policy | None = None,
) -> list[dict[str, Any]]:
    """``count`` audit rows of every kind, oldest first, for ``dag_ids`` x ``tasks_per_dag`` tasks whose DAG runs
    are spread evenly over the last ``days`` (so the table's ids grow with time, as the router's do)."""
    rng = random.Random(seed)
    policy = policy or load_policy(EXAMPLE_POLICY)
    tasks = _tasks(dag_ids, tasks_per_dag, rng)
    # About 2.2 rows per task instance: runs enough for ``count`` rows, over the window.
    runs = max(1, round(count / (2.2 * len(tasks))))
    now = now or datetime.now(timezone.utc)
    first = now - timedelta(days=days)
    step = timedelta(days=days) / runs
    rows: list[dict[str, Any]] = []
    number = 0
    while len(rows) < count:
        # Past ``runs`` (the estimate fell short) the same times take a second run each.
        start = first + step * (number % runs)
        run_id = f"scheduled__{start:%Y-%m-%dT%H:%M:%S}" + (f"_{number // runs}" if number >= runs else "")
        for task in tasks:
            rows.extend(row for row in _story(task, policy, run_id, start, rng) if row["dttm"] <= now)
        number += 1
    rows.sort(key=lambda row: row["dttm"])
    return rows[-count:]


def insert_rows(engine: Engine, rows: Sequence[dict[str, Any]]) -> None:
    """Append ``rows`` to the ``log`` table in their order, in one transaction."""
    from airflow.models import Log
    from sqlalchemy import insert

    with engine.begin() as connection:
        # An executemany: SQLAlchemy sends it as multi-row INSERTs sized to the driver's parameter limit.
        connection.execute(insert(Log.__table__), list(rows))


def dag_file(
    dag_ids: Sequence[str], tasks_per_dag: int, access_control: dict[str, dict[str, set[str]]] | None = None
) -> str:
    """A DAG file defining ``dag_ids``, each of ``tasks_per_dag`` empty tasks named as ``routing_rows`` names them;
    ``access_control`` maps a DAG id to its per-role rights (FAB's ``access_control``)."""
    return f"""
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG

ACCESS = {access_control or {}!r}

for dag_id in {list(dag_ids)!r}:
    with DAG(dag_id, schedule=None, access_control=ACCESS.get(dag_id)) as dag:
        for number in range({tasks_per_dag}):
            EmptyOperator(task_id=f"task_{{number:02d}}")
    globals()[dag_id] = dag
"""

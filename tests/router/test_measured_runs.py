"""One audit row per finished run (``measured_runs.RunRecorder``), and the reader of the memory they measured
(``TaskMemoryHistory``), on SQLite and PostgreSQL: one query per ``ttl``, never one per lookup."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from airflow.utils.state import TaskInstanceState
from router_fakes import DyingChild, FakeChild
from sqlalchemy import create_engine, event
from sqlalchemy.orm import sessionmaker

from devtools.workloads import make_workload
from hybrid_router.child_protocol import RunMeasurement
from hybrid_router.router import executor as executor_module
from hybrid_router.router.audit import AuditLog
from hybrid_router.router.children import Child
from hybrid_router.router.executor import RoutingExecutor
from hybrid_router.router.measured_runs import (
    OutOfMemoryRun,
    RunRecorder,
    TaskMemory,
    TaskMemoryHistory,
)
from hybrid_router.router.policy import load_policy

RUN_EVENT = "hybrid_router.run_finished"

POLICY = """
version: 1
executors:
  lambda: {class: router_fakes.DyingChild, max_concurrency: 3, limits: {max_duration: 15m, max_memory_mb: 3008}}
  local: {class: router_fakes.FakeChild, max_concurrency: 2}
defaults: {expected_duration: 1m, memory_mb: 512, run_on: local}
settings: {fallback_mode: same_try, max_fallbacks: 1}
rules:
  - name: to lambda
    if: {queue: lambda}
    run_on: lambda
    fallback: [local]
  - name: everything else
    run_on: local
"""


class MeasuringChild(DyingChild):
    """A Lambda-like child: it measures what its runs use (``child_protocol.ReportsRunMeasurements``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.measured: dict[Any, RunMeasurement] = {}

    def pop_run_measurement(self, key: Any) -> RunMeasurement | None:
        return self.measured.pop(key, None)


class FakeTimer:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_rows(rows: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(row.task_id, json.loads(row.extra)) for row in rows if row.event == RUN_EVENT]


# -- writing: through the router ---------------------------------------------------------------------------------


@pytest.fixture
def queued() -> dict[Any, Any]:
    """The workloads the test queued, by task instance id: what the fallback's reset hands back."""
    return {}


@pytest.fixture
def router(write_policy, audit_rows, task_log_folder, monkeypatch, queued) -> RoutingExecutor:
    policy = load_policy(write_policy(POLICY))
    children = {
        "lambda": Child(
            "lambda", MeasuringChild(parallelism=3, label="lambda"), max_concurrency=3, max_memory_mb=3008
        ),
        "local": Child("local", FakeChild(parallelism=2, label="local"), max_concurrency=2),
    }
    router = RoutingExecutor(parallelism=8, policy=policy, children=children)
    # No metadata database here: the fallback's reset and the local runs' durations are not read.
    monkeypatch.setattr(executor_module, "redispatch_same_try", lambda ti_id, try_number, *_: queued[ti_id])
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)
    router.start()
    return router


def test_every_finished_run_leaves_a_row_of_what_it_used(router, audit_rows, queued):
    lambda_child = router.children["lambda"].executor
    local_child = router.children["local"].executor
    fits, hog, own_failure = (make_workload(name, queue="lambda") for name in ("fits", "hog", "own_failure"))
    for workload in (fits, hog, own_failure):
        queued[workload.ti.id] = workload
        router.queue_workload(workload, session=None)
    router.heartbeat()

    lambda_child.measured[fits.ti.key] = RunMeasurement(512, 187, 1811.4, 1812)
    lambda_child.finish(fits.ti.key, TaskInstanceState.SUCCESS)
    lambda_child.measured[own_failure.ti.key] = RunMeasurement(512, 90, 120.0, 120)
    lambda_child.finish(own_failure.ti.key, TaskInstanceState.FAILED)
    # Killed by Lambda: no figures of its own, and the same try goes to the fallback.
    lambda_child.die(hog.ti.key, "out_of_memory", "Runtime exited with error: signal: killed")
    router.heartbeat()
    local_child.finish(hog.ti.key, TaskInstanceState.SUCCESS)
    router.heartbeat()

    assert run_rows(audit_rows) == [
        (
            "fits",
            {
                "executor": "lambda",
                "outcome": "success",
                "memory_size_mb": 512,
                "peak_mb": 187,
                "duration_ms": 1811,
                "billed_ms": 1812,
            },
        ),
        (
            "own_failure",
            {
                "executor": "lambda",
                "outcome": "failed",
                "memory_size_mb": 512,
                "peak_mb": 90,
                "duration_ms": 120,
                "billed_ms": 120,
            },
        ),
        (
            "hog",
            {
                "executor": "lambda",
                "outcome": "out_of_memory",
                "memory_size_mb": 3008,  # the child's limits.max_memory_mb: the function's size
                "peak_mb": 3008,
                "duration_ms": None,
                "billed_ms": None,
            },
        ),
        (
            "hog",
            {
                "executor": "local",
                "outcome": "success",
                "memory_size_mb": None,
                "peak_mb": None,
                "duration_ms": None,  # no task_instance table to read it from here
                "billed_ms": None,
            },
        ),
    ]
    rows = [row for row in audit_rows if row.event == RUN_EVENT]
    assert {(row.dag_id, row.run_id, row.try_number, row.owner) for row in rows} == {
        ("dag", "run", 1, "hybrid_router")
    }


# -- writing: the durations of runs no child timed ---------------------------------------------------------------


@pytest.fixture
def sqlite_engine(tmp_path) -> Iterator[Any]:
    from airflow.models import Log
    from airflow.models.base import Base
    from airflow.models.taskinstance import TaskInstance

    engine = create_engine(f"sqlite:///{tmp_path / 'metadata.db'}")
    Base.metadata.create_all(engine, tables=[TaskInstance.__table__, Log.__table__])
    yield engine
    engine.dispose()


def add_task_instance(
    engine: Any, key: Any, ti_id: uuid.UUID, start: datetime, end: datetime | None, state: str = "success"
) -> None:
    from airflow.models.taskinstance import TaskInstance

    row = {
        "id": ti_id,
        "dag_id": key.dag_id,
        "task_id": key.task_id,
        "run_id": key.run_id,
        "map_index": key.map_index,
        "try_number": key.try_number,
        "start_date": start,
        "end_date": end,
        "queued_dttm": start - timedelta(seconds=3),
        "state": state,
        "pool": "default_pool",
        "pool_slots": 1,
        "queue": "default",
    }
    with engine.begin() as connection:
        connection.execute(TaskInstance.__table__.insert().values(**row))


def local_child() -> Child:
    return Child("local", FakeChild(label="local"))


def test_a_run_no_child_timed_gets_its_task_instances_worker_time_with_one_query(sqlite_engine):
    audit = AuditLog()
    recorder = RunRecorder(audit, sessionmaker(sqlite_engine))
    start = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    timed, unfinished, other_try = (make_workload(name) for name in ("timed", "unfinished", "other_try"))
    add_task_instance(sqlite_engine, timed.ti.key, timed.ti.id, start, start + timedelta(seconds=42.5))
    add_task_instance(sqlite_engine, unfinished.ti.key, unfinished.ti.id, start, None)
    moved_on = other_try.ti.key._replace(try_number=2)  # the row is another try's by now
    add_task_instance(sqlite_engine, moved_on, other_try.ti.id, start, start + timedelta(seconds=5))
    queries: list[str] = []
    event.listen(sqlite_engine, "before_cursor_execute", lambda *args: queries.append(args[2]))

    for workload in (timed, unfinished, other_try):
        recorder.finished(workload.ti.key, local_child(), workload.ti.id, TaskInstanceState.SUCCESS, None)
    assert recorder.flush() == 3

    durations = {row.task_id: json.loads(row.extra)["duration_ms"] for row in audit._pending}
    assert durations == {"timed": 42500, "unfinished": None, "other_try": None}
    assert len(queries) == 1
    # A run that died for infrastructure reasons is not timed from its task instance: the try lives on.
    queries.clear()
    recorder.finished(timed.ti.key, local_child(), timed.ti.id, TaskInstanceState.FAILED, _failure("timeout"))
    recorder.flush()
    assert queries == []


def test_the_rows_go_without_durations_while_the_database_cannot_be_read(caplog):
    def broken() -> Any:
        raise ConnectionError("database is down")

    audit = AuditLog()
    recorder = RunRecorder(audit, broken)
    for name in ("a", "b"):
        workload = make_workload(name)
        recorder.finished(workload.ti.key, local_child(), workload.ti.id, TaskInstanceState.SUCCESS, None)
        assert recorder.flush() == 1
    assert [json.loads(row.extra)["duration_ms"] for row in audit._pending] == [None, None]
    assert sum("database is down" in r.getMessage() for r in caplog.records) == 1  # once per outage


def _failure(reason: str) -> Any:
    from hybrid_router.child_protocol import InfrastructureFailure

    return InfrastructureFailure(reason=reason)


# -- reading, on SQLite and PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def log_engine(request, tmp_path) -> Iterator[Any]:
    """A database with Airflow's ``log`` table (all the reader reads), and the statements run on it."""
    from airflow.models import Log

    url = (
        f"sqlite:///{tmp_path / 'log.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = create_engine(url)
    Log.__table__.create(engine)
    engine.queries = []
    event.listen(engine, "before_cursor_execute", lambda *args: engine.queries.append(args[2]))
    yield engine
    engine.dispose()


NOW = datetime.now(timezone.utc)


def write_runs(engine: Any, runs: list[tuple[str, str, str, RunMeasurement | None, timedelta]]) -> None:
    """(task_id, executor, outcome, measurement, age) rows, written as the router writes them."""
    from airflow.models import Log

    audit = AuditLog()
    recorder = RunRecorder(audit, sessionmaker(engine))
    limits = {"lambda": 512, "lambda_3g": 3008}
    for task_id, executor, outcome, measured, _ in runs:
        child = Child(executor, MeasuringChild(), max_memory_mb=limits.get(executor))
        key = make_workload(task_id).ti.key
        if measured is not None:
            child.executor.measured[key] = measured
        failure = _failure(outcome) if outcome not in ("success", "failed") else None
        recorder.finished(key, child, uuid.uuid4(), outcome, failure)
    recorder.flush()
    rows = list(audit._pending)
    for row, (*_, age) in zip(rows, runs, strict=True):
        row.dttm = NOW - age
    # Rows another writer may have left: other events, owners or extras; none of them is a measurement.
    stray = make_workload("load").ti.key
    rows += [
        Log(
            event="hybrid_router.routed",
            task_instance=stray,
            owner="hybrid_router",
            extra='{"peak_mb": 9999}',
        ),
        Log(event=RUN_EVENT, task_instance=stray, owner="someone", extra='{"peak_mb": 9999}'),
        Log(event=RUN_EVENT, task_instance=stray, owner="hybrid_router", extra="not json"),
        Log(event=RUN_EVENT, task_instance=stray, owner="hybrid_router", extra='{"peak_mb": "9999"}'),
    ]
    with sessionmaker(engine).begin() as session:
        session.add_all(rows)


def measured(peak_mb: int) -> RunMeasurement:
    return RunMeasurement(
        memory_size_mb=3008, peak_memory_mb=peak_mb, duration_ms=1000.0, billed_duration_ms=1000
    )


def test_the_reader_gives_each_tasks_peaks_and_out_of_memory_deaths_with_one_query_per_ttl(log_engine):
    hour = timedelta(hours=1)
    write_runs(
        log_engine,
        [
            ("load", "lambda", "success", RunMeasurement(512, 300, 900.0, 900), 50 * hour),
            ("load", "lambda", "out_of_memory", None, 40 * hour),
            ("load", "lambda_3g", "out_of_memory", None, 30 * hour),
            ("load", "lambda", "out_of_memory", None, 20 * hour),
            *(
                ("load", "lambda_3g", "success", measured(peak), (10 - i) * hour)
                for i, peak in enumerate(range(1000, 2000, 100))
            ),
            ("load", "local", "success", RunMeasurement(duration_ms=2000.0), hour),  # no peak measured
            ("old", "lambda", "out_of_memory", None, 20 * 24 * hour),  # outside the 14-day window
            ("small", "lambda", "failed", RunMeasurement(512, 80, 50.0, 50), hour),
        ],
    )
    timer = FakeTimer()
    history = TaskMemoryHistory(sessionmaker(log_engine), days=14, ttl=300, timer=timer)
    log_engine.queries.clear()

    load = history("dag", "load")
    assert isinstance(load, TaskMemory)
    assert load.peaks_mb == (300, *range(1000, 2000, 100))  # oldest first, out-of-memory runs left out
    assert load.p95_peak_mb == pytest.approx(1850.0)
    sizes = [(run.executor, run.memory_size_mb) for run in load.out_of_memory]
    assert sizes == [("lambda", 512), ("lambda_3g", 3008), ("lambda", 512)]
    assert (load.latest_out_of_memory.executor, load.latest_out_of_memory.memory_size_mb) == ("lambda", 512)
    largest = load.largest_out_of_memory
    assert isinstance(largest, OutOfMemoryRun) and (largest.executor, largest.memory_size_mb) == (
        "lambda_3g",
        3008,
    )
    assert abs(largest.at - (NOW - 30 * hour)) < timedelta(seconds=1) and largest.at.tzinfo is not None
    assert history("dag", "small") == TaskMemory("dag", "small", (80,), 80.0, ())
    assert history("dag", "old") is None and history("dag", "never_ran") is None
    for _ in range(100):
        history("dag", "load")
    assert len(log_engine.queries) == 1

    timer.now += 301
    history("dag", "load")
    assert len(log_engine.queries) == 2


def test_the_reader_answers_nothing_while_the_database_cannot_be_read(tmp_path, caplog):
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no log table: every read fails
    timer = FakeTimer()
    history = TaskMemoryHistory(sessionmaker(engine), days=14, ttl=10, timer=timer)
    for _ in range(3):
        assert history("dag", "load") is None
        timer.now += 11
    assert "no such table" in history.last_error
    assert sum("Measured memory history unavailable" in r.getMessage() for r in caplog.records) == 1
    engine.dispose()


def test_a_death_noted_by_the_router_counts_at_once_and_the_largest_one_wins(log_engine):
    from hybrid_router.router.policy.facts import OutOfMemory

    write_runs(
        log_engine, [("load", "lambda", "success", RunMeasurement(512, 300, 900.0, 900), timedelta(0))]
    )
    history = TaskMemoryHistory(sessionmaker(log_engine), days=14, ttl=300, timer=FakeTimer())
    assert history.evidence("dag", "load").out_of_memory is None
    log_engine.queries.clear()

    now = datetime.now(timezone.utc)
    history.note_out_of_memory("dag", "load", OutOfMemoryRun("lambda_3g", 3008, now))
    history.note_out_of_memory("dag", "load", OutOfMemoryRun("lambda", 512, now))  # proves less: kept out
    history.note_out_of_memory("dag", "unsized", OutOfMemoryRun("lambda", None, now))  # proves nothing
    history.note_out_of_memory("dag", "stale", OutOfMemoryRun("lambda", 512, now - timedelta(days=15)))
    load = history.evidence("dag", "load")
    assert (load.runs, load.out_of_memory) == (1, OutOfMemory(3008, "lambda_3g", now))
    assert history.evidence("dag", "unsized") is None and history.evidence("dag", "stale") is None
    assert history("dag", "load").out_of_memory == ()  # the database's answer, as read
    assert log_engine.queries == []  # no read of its own


def test_a_run_that_ended_by_itself_is_recorded_as_its_task_ended_not_as_its_child_said(sqlite_engine):
    """Airflow's task runner exits 0 after a task that failed: LocalExecutor and the Lambda handler then report
    success. The task instance's state says how the task ended, read with the same one query as the durations."""
    audit = AuditLog()
    recorder = RunRecorder(audit, sessionmaker(sqlite_engine))
    start = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    names = ("raised", "retries", "fine", "still_running", "moved_on")
    raised, retries, fine, still_running, moved_on = (make_workload(name) for name in names)
    states = [(raised, "failed"), (retries, "up_for_retry"), (fine, "success"), (still_running, "running")]
    for workload, state in states:
        add_task_instance(sqlite_engine, workload.ti.key, workload.ti.id, start, start, state=state)
    add_task_instance(  # a later try is in the row by now: it says nothing of this run
        sqlite_engine, moved_on.ti.key._replace(try_number=2), moved_on.ti.id, start, start, state="failed"
    )
    queries: list[str] = []
    event.listen(sqlite_engine, "before_cursor_execute", lambda *args: queries.append(args[2]))

    lambda_child = Child("lambda", MeasuringChild(), max_memory_mb=512)
    for workload in (raised, retries, fine, moved_on):
        lambda_child.executor.measured[workload.ti.key] = RunMeasurement(512, 180, 900.0, 900)
        recorder.finished(workload.ti.key, lambda_child, workload.ti.id, TaskInstanceState.SUCCESS, None)
    # The worker died before the task runner could report: the child's word stands.
    recorder.finished(
        still_running.ti.key, local_child(), still_running.ti.id, TaskInstanceState.FAILED, None
    )
    assert recorder.flush() == 5

    outcomes = {row.task_id: json.loads(row.extra)["outcome"] for row in audit._pending}
    assert outcomes == {
        "raised": "failed",
        "retries": "failed",
        "fine": "success",
        "still_running": "failed",
        "moved_on": "success",
    }
    assert len(queries) == 1

"""TaskDurationHistory against a real (migrated SQLite) Airflow metadata database."""

from __future__ import annotations

import logging
import statistics
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.orm import sessionmaker

from hybrid_router.router.history import TaskDurationHistory, percentile, worker_seconds


class FakeTimer:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def counted_engine(metadata_db):
    engine = create_engine(metadata_db.url)
    engine.queries = []

    @event.listens_for(engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        engine.queries.append(statement)

    try:
        yield engine
    finally:
        engine.dispose()


def history_on(engine, timer=None, **kwargs) -> TaskDurationHistory:
    options = {"days": 14, "min_runs": 3, "ttl": 300}
    options.update(kwargs)
    return TaskDurationHistory(sessionmaker(engine), timer=timer or FakeTimer(), **options)


def test_p95_of_successful_runs_matches_the_inclusive_quantile(runs, counted_engine):
    durations = [float(s) for s in (3, 8, 15, 21, 30, 45, 60, 61, 90, 120, 300, 600)]
    for seconds in durations:
        runs.add("etl", "load", seconds)
    runs.add("etl", "load", 5000, state="failed")  # a failed run says nothing about a successful one
    runs.add("etl", "load", 7000, ended_ago=timedelta(days=20))  # outside the 14-day window
    runs.add("etl", "load", 9000, hostname=None)  # marked successful by hand, never ran

    expected = statistics.quantiles(durations, n=20, method="inclusive")[18]
    assert history_on(counted_engine).p95("etl", "load") == pytest.approx(expected)


def test_earlier_tries_in_task_instance_history_count(runs, counted_engine):
    runs.add("etl", "load", 10)
    runs.add("etl", "load", 20, archived=True)
    runs.add("etl", "load", 30, archived=True)
    history = history_on(counted_engine)
    stats = history.stats()[("etl", "load")]
    assert (stats.runs, stats.worker_seconds) == (3, 60)
    assert history.p95("etl", "load") == pytest.approx(29.0)


def test_fewer_runs_than_min_runs_gives_no_estimate(runs, counted_engine):
    runs.add("etl", "rare", 100)
    runs.add("etl", "rare", 120)
    assert history_on(counted_engine, min_runs=3).p95("etl", "rare") is None
    assert history_on(counted_engine, min_runs=2).p95("etl", "rare") == pytest.approx(119.0)
    assert history_on(counted_engine).p95("etl", "never_ran") is None


def test_time_spent_deferred_is_not_counted(runs, counted_engine):
    for _ in range(3):
        runs.add("sensors", "wait_for_file", 40, deferred_for=3 * 3600)
    p95 = history_on(counted_engine).p95("sensors", "wait_for_file")
    assert p95 == pytest.approx(40, abs=0.01)


def test_one_query_for_all_tasks_until_the_ttl_expires(runs, counted_engine):
    for task in range(30):
        for seconds in (10, 20, 30):
            runs.add("many", f"task_{task}", seconds + task)
    timer = FakeTimer()
    history = history_on(counted_engine, timer=timer, ttl=300)
    counted_engine.queries.clear()

    for _ in range(3):
        for task in range(30):
            assert history.p95("many", f"task_{task}") == pytest.approx(29 + task)
        history.p95("many", "unknown")
    assert len(counted_engine.queries) == 1
    assert "task_instance_history" in counted_engine.queries[0]

    timer.now += 299
    history.p95("many", "task_0")
    assert len(counted_engine.queries) == 1
    timer.now += 2
    history.p95("many", "task_0")
    assert len(counted_engine.queries) == 2


def test_database_errors_are_logged_once_and_give_no_estimate(tmp_path, caplog):
    # a database that was never migrated: every read fails with "no such table"
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    timer = FakeTimer()
    history = history_on(engine, timer=timer, ttl=10)
    with caplog.at_level(logging.WARNING, logger="hybrid_router.router.history"):
        for _ in range(3):
            assert history.p95("etl", "load") is None
            timer.now += 11  # every call reads again
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no such table" in warnings[0].getMessage()
    assert "no such table" in history.last_error
    engine.dispose()


def test_reads_again_after_an_outage(runs, counted_engine, metadata_db):
    runs.add("etl", "load", 10)
    broken = True

    def flaky_session():
        if broken:
            raise ConnectionError("database is down")
        return sessionmaker(counted_engine)()

    timer = FakeTimer()
    history = TaskDurationHistory(flaky_session, days=14, min_runs=1, ttl=5, timer=timer)
    assert history.p95("etl", "load") is None
    assert history.last_error == "ConnectionError: database is down"
    broken = False
    timer.now += 6
    assert history.p95("etl", "load") == pytest.approx(10)
    assert history.last_error is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"days": 0}, "days"), ({"min_runs": 0}, "min_runs"), ({"ttl": -1}, "ttl")],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    options = {"days": 14, "min_runs": 3, "ttl": 300, **kwargs}
    with pytest.raises(ValueError, match=message):
        TaskDurationHistory(lambda: None, **options)


def test_percentile_and_worker_seconds_edges():
    assert percentile([42.0], 0.95) == 42.0
    assert percentile([0.0, 100.0], 0.95) == pytest.approx(95.0)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert worker_seconds(None, t0, None) is None
    assert worker_seconds(t0, t0 - timedelta(seconds=1), None) is None  # end before start: not a run
    assert worker_seconds(t0, t0 + timedelta(seconds=50), t0 - timedelta(seconds=5)) == 50
    assert worker_seconds(t0, t0 + timedelta(seconds=50), t0 + timedelta(seconds=45)) == 5

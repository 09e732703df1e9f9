"""Each router's live figures in ``hybrid_router_live_state``: written on the heartbeat, read by the Routing page.

On the tests' own SQLite database (``tests/conftest.py``'s AIRFLOW_HOME) through Airflow's ``create_session``, as
the scheduler writes it; the table is the router's own, so no Airflow migration is needed. PostgreSQL for two
schedulers creating the table at once.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import partial

import pytest
from router_fakes import FakeChild
from sqlalchemy import create_engine, event, func, insert, select, text
from sqlalchemy.orm import Session
from test_shared_capacity import ME, Rows, airflow_engine, key, limits_on, router_children

from devtools.workloads import make_workload
from hybrid_router.router.children import Child
from hybrid_router.router.config import RouterConfig
from hybrid_router.router.executor import RoutingExecutor
from hybrid_router.router.live_state import (
    CLEANUP_EVERY_S,
    ERROR_LOG_EVERY_S,
    LiveState,
    LiveStatePublisher,
    live_state_table,
    read_live_states,
    router_snapshot,
)
from hybrid_router.router.waiting import Pending

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
SNAPSHOT = {"waiting": 0, "executors": []}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine():
    """The tests' Airflow database, without the live-state table (created by the first publish)."""
    from airflow import settings

    live_state_table.drop(settings.engine, checkfirst=True)
    yield settings.engine
    live_state_table.drop(settings.engine, checkfirst=True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def publisher(clock: FakeClock, every_s: float = 1.0, **kwargs) -> LiveStatePublisher:
    options = {"utcnow": lambda: NOW, "hostname": lambda: "host-1", "pid": lambda: 4242, **kwargs}
    return LiveStatePublisher(every_s, clock=clock, **options)


def read(engine) -> list[LiveState]:
    with Session(engine) as session:
        return read_live_states(session)


def test_a_published_snapshot_reads_back_with_its_scheduler_and_time(engine, clock):
    state = {"waiting": 2, "executors": [{"name": "lambda", "in_flight": 3, "pool": None}]}
    assert publisher(clock).publish(state, job_id=7)
    (live,) = read(engine)
    assert live == LiveState(scheduler="job-7", hostname="host-1", job_id=7, published_at=NOW, state=state)
    assert live.published_at.utcoffset() == timedelta(0)


def test_without_a_scheduler_job_the_row_is_the_process(engine, clock):
    assert publisher(clock).publish(SNAPSHOT, job_id=None)
    assert [(live.scheduler, live.job_id) for live in read(engine)] == [("host-1:4242", None)]


def test_reading_before_any_router_created_the_table_gives_nothing(engine):
    with Session(engine) as session:
        assert read_live_states(session) == []
        assert session.execute(select(1)).scalar() == 1  # the caller's session goes on working


def test_writes_at_most_once_per_interval_and_builds_the_snapshot_only_then(engine, clock):
    built = []

    def snapshot():
        built.append(clock.now)
        return {"waiting": len(built), "executors": []}

    live = publisher(clock, every_s=1.0)
    assert live.publish(snapshot, job_id=1)
    clock.now += 0.5
    assert not live.publish(snapshot, job_id=1)
    assert built == [1000.0] and read(engine)[0].state["waiting"] == 1
    clock.now += 0.5
    assert live.publish(snapshot, job_id=1)
    assert read(engine)[0].state["waiting"] == 2


def test_an_interval_of_zero_publishes_nothing(engine, clock):
    assert not publisher(clock, every_s=0).publish(SNAPSHOT, job_id=1)
    assert read(engine) == []
    with pytest.raises(ValueError, match="every_s must be >= 0"):
        publisher(clock, every_s=-1)


def test_one_row_per_scheduler_updated_in_place(engine, clock):
    first, second = publisher(clock), publisher(clock, hostname=lambda: "host-2")
    for waiting in range(3):
        assert first.publish({"waiting": waiting, "executors": []}, job_id=1)
        assert second.publish({"waiting": 10 + waiting, "executors": []}, job_id=2)
        clock.now += 1
    rows = read(engine)
    assert [(r.scheduler, r.hostname, r.state["waiting"]) for r in rows] == [
        ("job-1", "host-1", 2),
        ("job-2", "host-2", 12),
    ]


def test_the_process_row_becomes_the_job_row_once_the_job_is_known(engine, clock):
    live = publisher(clock)
    assert live.publish(SNAPSHOT, job_id=None)
    clock.now += 1
    assert live.publish(SNAPSHOT, job_id=5)
    assert [r.scheduler for r in read(engine)] == ["job-5"]


def test_withdraw_deletes_this_schedulers_row_only(engine, clock):
    stopping, staying = publisher(clock), publisher(clock)
    stopping.publish(SNAPSHOT, job_id=1)
    staying.publish(SNAPSHOT, job_id=2)
    stopping.withdraw()
    assert [r.scheduler for r in read(engine)] == ["job-2"]
    publisher(clock).withdraw()  # never published: nothing to delete, and no error


@contextmanager
def airflow_session():
    from airflow.utils.session import create_session

    with create_session(scoped=False) as session:
        yield session


def test_a_database_error_never_raises_is_logged_once_a_minute_and_retried(engine, clock, caplog):
    down = True

    @contextmanager
    def flaky_session():
        if down:
            raise ConnectionError("database is down")
        with airflow_session() as session:
            yield session

    live = publisher(clock, session=flaky_session)
    with caplog.at_level(logging.INFO, logger="hybrid_router.router.live_state"):
        assert not live.publish(SNAPSHOT, job_id=1)
        for _ in range(3):
            clock.now += 1
            assert not live.publish(SNAPSHOT, job_id=1)
        clock.now += ERROR_LOG_EVERY_S
        assert not live.publish(SNAPSHOT, job_id=1)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and all("ConnectionError: database is down" in w for w in warnings)
        down = False
        clock.now += 0.5
        assert not live.publish(SNAPSHOT, job_id=1)  # not due yet: the failed try counts as the last write
        clock.now += 0.5
        assert live.publish(SNAPSHOT, job_id=1)
    assert "Publishing the router's live state again" in caplog.messages
    assert [r.scheduler for r in read(engine)] == ["job-1"]


def test_a_failing_snapshot_never_raises_either(engine, clock):
    def broken():
        raise RuntimeError("a child's bug")

    assert not publisher(clock).publish(broken, job_id=1)


def test_rows_not_published_for_a_day_are_deleted_once_an_hour_at_most(engine, clock):
    def other_scheduler(name: str, age: timedelta) -> None:
        with engine.begin() as connection:
            connection.execute(
                insert(live_state_table).values(
                    scheduler=name, hostname="gone", job_id=None, published_at=NOW - age, state="{}"
                )
            )

    live_state_table.create(engine)  # by the other schedulers, long ago
    other_scheduler("dead", timedelta(days=1, seconds=1))
    other_scheduler("quiet", timedelta(hours=23))
    live = publisher(clock)
    live.publish(SNAPSHOT, job_id=1)
    assert sorted(r.scheduler for r in read(engine)) == ["job-1", "quiet"]
    other_scheduler("dead_later", timedelta(days=2))
    clock.now += CLEANUP_EVERY_S - 1
    live.publish(SNAPSHOT, job_id=1)
    assert "dead_later" in {r.scheduler for r in read(engine)}
    clock.now += 1
    live.publish(SNAPSHOT, job_id=1)
    assert sorted(r.scheduler for r in read(engine)) == ["job-1", "quiet"]


# -- the snapshot and the router ----------------------------------------------------------------------------


def test_the_snapshot_counts_each_waiting_task_on_its_first_choice():
    children = {
        "local_a": Child("local_a", FakeChild(parallelism=4), max_concurrency=2),
        "local_b": Child("local_b", FakeChild(parallelism=3)),
    }
    children["local_a"].in_flight |= {key("a1"), key("a2")}
    waiting = [
        Pending(candidates=("local_a", "local_b"), decision=None),
        Pending(candidates=("local_a",), decision=None),
        Pending(candidates=("local_b",), decision=None),
        Pending(candidates=(), decision=None),  # no executor of its policy is configured here
    ]
    assert router_snapshot(children, waiting) == {
        "waiting": 4,
        "executors": [
            {
                "name": "local_a",
                "class": "FakeChild",
                "available": True,
                "in_flight": 2,
                "limit": 2,
                "free": 0,
                "waiting": 2,
                "pool": None,
            },
            {
                "name": "local_b",
                "class": "FakeChild",
                "available": True,
                "in_flight": 0,
                "limit": 3,
                "free": 3,
                "waiting": 1,
                "pool": None,
            },
        ],
    }


def test_a_shared_pool_shows_every_schedulers_runs_from_the_routers_last_count_and_adds_no_query():
    engine = airflow_engine("sqlite://")
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    try:
        Rows(engine).add("lambda@1|lambda:fn:req-1:d1+run-1")  # another scheduler's run on the function
        children = router_children(job_id=ME, limit=4)
        limits_on(engine, children)  # its clock stands still: the count is never due again
        children["lambda"].in_flight.add(key("mine"))
        children["lambda"].free_slots()  # the router's own count, as its heartbeat makes it
        statements.clear()
        lambda_, local = router_snapshot(children, [])["executors"]
        assert statements == []
        assert lambda_["pool"] == {"key": "lambda:fn", "limit": 4, "in_flight": 1 + 1}
        assert lambda_["free"] == 4 - 1 - 1
        assert local["pool"] is None
    finally:
        engine.dispose()


def test_a_shared_pool_not_counted_yet_has_no_in_flight_figure():
    children = router_children(job_id=None, limit=4)  # no scheduler job: the router never counts
    assert router_snapshot(children, [])["executors"][0]["pool"] == {
        "key": "lambda:fn",
        "limit": 4,
        "in_flight": None,
    }


POLICY = """
version: 1
executors:
  local: {class: router_fakes.FakeChild, max_concurrency: 1}
  spare: {class: router_fakes.FakeChild, max_concurrency: 2}
defaults: {expected_duration: 1m, memory_mb: 512, run_on: local}
rules:
  - name: everything
    run_on: local
"""


def test_a_router_publishes_on_its_heartbeat_and_withdraws_its_row_when_it_ends(
    engine, clock, write_policy, audit_rows
):
    config = RouterConfig(policy_file=write_policy(POLICY), history_days=0, live_state_interval=1.0)
    children = {
        "local": Child("local", FakeChild(parallelism=4), max_concurrency=1),
        "spare": Child("spare", FakeChild(parallelism=4), max_concurrency=2),
    }
    router = RoutingExecutor(config=config, children=children, clock=clock)
    router.start()
    for task in ("t1", "t2", "t3"):
        router.queue_workload(make_workload(task), session=None)
    before = datetime.now(timezone.utc)
    router.heartbeat()
    (live,) = read(engine)
    assert before <= live.published_at <= datetime.now(timezone.utc)
    assert live.job_id is None  # no scheduler job here: the row is the process's
    assert live.state["waiting"] == 2
    assert [
        (e["name"], e["class"], e["in_flight"], e["free"], e["waiting"]) for e in live.state["executors"]
    ] == [
        ("local", "FakeChild", 1, 0, 2),
        ("spare", "FakeChild", 0, 2, 0),
    ]
    router.end()
    assert read(engine) == []


def test_a_router_configured_by_hand_publishes_nothing(engine, clock, write_policy, audit_rows):
    from types import SimpleNamespace

    config = SimpleNamespace(
        policy_file=write_policy(POLICY), reload_interval=5.0, audit_log=True, history_enabled=False
    )
    router = RoutingExecutor(config=config, children={"local": Child("local", FakeChild())}, clock=clock)
    router.start()
    router.heartbeat()
    assert read(engine) == []


# -- PostgreSQL: two schedulers creating the table at once ---------------------------------------------------


def test_two_schedulers_creating_the_table_at_once_on_postgres_both_publish(postgres_url):
    engine = create_engine(postgres_url)
    try:
        with Session(engine) as session:
            assert read_live_states(session) == []  # no table yet, and the transaction is not aborted
            assert session.execute(select(1)).scalar() == 1
        # One scheduler is half-way through creating the table: its CREATE is not committed yet.
        first = engine.connect()
        first_transaction = first.begin()
        live_state_table.create(first, checkfirst=True)

        second = LiveStatePublisher(session=partial(_session_of, engine))
        result: list[bool] = []
        publishing = threading.Thread(target=lambda: result.append(second.publish(SNAPSHOT, job_id=2)))
        publishing.start()
        _wait_for_a_lock_wait(engine)  # the second's CREATE waits for the first's transaction
        first_transaction.commit()
        first.close()
        publishing.join(timeout=60)
        assert result == [True]  # the duplicate-table error was caught, the table re-checked and used

        assert LiveStatePublisher(session=partial(_session_of, engine)).publish(SNAPSHOT, job_id=1)
        with Session(engine) as session:
            assert [live.scheduler for live in read_live_states(session)] == ["job-1", "job-2"]
    finally:
        engine.dispose()


@contextmanager
def _session_of(engine):
    with Session(engine) as session, session.begin():
        yield session


def _wait_for_a_lock_wait(engine, attempts: int = 600) -> None:
    import time

    for _ in range(attempts):
        with engine.connect() as connection:
            waiting = connection.execute(
                select(func.count())
                .select_from(text("pg_stat_activity"))
                .where(text("wait_event_type = 'Lock' AND datname = current_database()"))
            ).scalar()
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError("the second CREATE never waited for the first")

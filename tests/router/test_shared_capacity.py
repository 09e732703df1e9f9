"""A Lambda function's concurrency shared by the routers of several schedulers, counted in the metadata database.

SQLite for the count and the hand-over; PostgreSQL for the lock that keeps two routers from handing out the same
slot (the end-to-end test runs the real thing: ``test_e2e_shared_capacity.py``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.models.taskinstancekey import TaskInstanceKey
from router_fakes import FakeChild
from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from hybrid_router.child_protocol import SharedConcurrency
from hybrid_router.lambda_exec.capacity import shared_concurrency
from hybrid_router.router import shared_capacity
from hybrid_router.router.children import Child
from hybrid_router.router.shared_capacity import SharedLimits, hand_over, link_shared_limits, lock_id

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
ME, OTHER, ANOTHER = 1, 2, 3


class SharingChild(FakeChild):
    """A child whose capacity is a function's concurrency, as the Lambda executor describes it."""

    def __init__(self, *args: Any, function: str = "fn", limit: int | None = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.function, self.limit = function, limit

    def shared_concurrency(self) -> SharedConcurrency | None:
        return shared_concurrency(self.function, self.limit)

    def note_others_in_flight(self, count: int) -> None:
        self.others_in_flight = count


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def airflow_engine(url: str):
    from airflow.models import import_all_models
    from airflow.models.base import Base

    import_all_models()
    options = (
        {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}} if url == "sqlite://" else {}
    )
    engine = create_engine(url, **options)
    Base.metadata.create_all(engine)
    return engine


@contextmanager
def session_of(engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
        session.commit()


class Rows:
    """Task instances written as the schedulers leave them."""

    def __init__(self, engine) -> None:
        from airflow.models.taskinstance import TaskInstance

        self.engine = engine
        self.table = TaskInstance.__table__

    def add(
        self,
        external_id: str | None,
        *,
        state: str = "running",
        job: int | None = OTHER,
        ended_ago: float | None = None,
        task_id: str | None = None,
    ) -> uuid.UUID:
        ti_id = uuid.uuid4()
        end = None if ended_ago is None else NOW - timedelta(seconds=ended_ago)
        row = {
            "id": ti_id,
            "task_id": task_id or f"t_{ti_id.hex[:8]}",
            "dag_id": "dag",
            "run_id": "run",
            "map_index": -1,
            "try_number": 1,
            "state": state,
            "pool": "default_pool",
            "pool_slots": 1,
            "queue": "default",
            "operator": "PythonOperator",
            "external_executor_id": external_id,
            "queued_by_job_id": job,
            "last_heartbeat_at": None if end is None else end - timedelta(seconds=1),
            "start_date": None if end is None else end - timedelta(seconds=10),
            "end_date": end,
        }
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Only task_instance matters here: no DAG, run or version rows for its foreign keys.
                connection.execute(text("SET LOCAL session_replication_role = replica"))
            connection.execute(self.table.insert().values(**row))
        return ti_id

    def external_ids(self) -> dict[uuid.UUID, str | None]:
        columns = self.table.c.id, self.table.c.external_executor_id
        with self.engine.connect() as connection:
            return {
                ti_id: value
                for ti_id, value in connection.execute(self.table.select().with_only_columns(*columns))
            }


@pytest.fixture
def engine():
    engine = airflow_engine("sqlite://")
    engine.queries = []

    @event.listens_for(engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        engine.queries.append(statement)

    yield engine
    engine.dispose()


def children_of(*children: Child, job_id: int | None = ME) -> dict[str, Child]:
    by_name = {child.name: child for child in children}
    for child in children:
        child.executor.job_id = job_id
    return by_name


def router_children(job_id: int | None = ME, limit: int | None = 4) -> dict[str, Child]:
    children = children_of(
        Child("lambda", SharingChild(parallelism=8, limit=limit), max_concurrency=limit),
        Child("local", FakeChild(parallelism=8)),
        job_id=job_id,
    )
    link_shared_limits(children)
    return children


def limits_on(engine, children: dict[str, Child], clock=None) -> SharedLimits:
    limits = SharedLimits(
        children, session=partial(session_of, engine), clock=clock or FakeClock(), utcnow=lambda: NOW
    )
    for child in children.values():
        if child.shared_limits is not None:
            child.shared_limits = limits
    return limits


def key(name: str) -> TaskInstanceKey:
    return TaskInstanceKey("dag", name, "run", 1, -1)


def test_room_is_the_limit_less_the_runs_of_every_scheduler(engine):
    rows = Rows(engine)
    children = router_children(limit=9)
    limits_on(engine, children)
    lambda_ = children["lambda"]
    lambda_.in_flight |= {key("mine_1"), key("mine_2")}  # this router's own: counted from its memory
    counted = [
        rows.add("lambda@1|lambda:fn:req-1:d1+run-1"),  # running on another scheduler's child
        rows.add("lambda@1", state="queued"),  # handed over by another router, not yet invoked
        rows.add("lambda:fn:req-2:d2", job=ANOTHER),  # a Lambda executor of its own, no router
        rows.add("lambda@1|lambda:fn:req-3:d3", state="success", ended_ago=1),  # its run may still be ending
    ]
    for not_counted in (
        ("(router)@1", {"state": "queued"}),  # waiting in another router
        ("local@1", {}),
        ("lambda@1|lambda:fn:req-4:d4", {"state": "success", "ended_ago": 30}),
        ("lambda@1|lambda:fn:req-5:d5", {"job": ME}),  # this router's: its memory says (mine_1, mine_2)
        ("lambda@1|lambda:fn:req-6:d6", {"state": "success", "job": ME, "ended_ago": 1}),  # its result came
        ("lambda:fnX:req-7:d7", {}),
    ):
        rows.add(not_counted[0], **not_counted[1])
    assert len(counted) == 4
    assert lambda_.free_slots() == 9 - 4 - 2
    assert children["local"].free_slots() == 8  # no shared pool: its own bounds only


def test_one_count_a_second_however_often_room_is_asked(engine):
    clock = FakeClock()
    children = router_children()
    limits_on(engine, children, clock)
    for _ in range(5):
        children["lambda"].free_slots()
    assert len(engine.queries) == 1
    clock.now += 1.0
    children["lambda"].free_slots()
    assert len(engine.queries) == 2


def test_the_pool_is_the_tightest_of_its_childrens_limits_and_each_draws_on_it(engine):
    rows = Rows(engine)
    children = children_of(
        Child("lambda", SharingChild(limit=4)),
        Child("lambda_10g", SharingChild(limit=3)),
    )
    link_shared_limits(children)
    limits_on(engine, children)
    children["lambda"].in_flight.add(key("mine"))
    rows.add("lambda_10g@1")  # another router's hand-over to the other child of the same function
    assert children["lambda"].free_slots() == children["lambda_10g"].free_slots() == 3 - 1 - 1


def chosen_for(children: dict[str, Child], rows: Rows, *targets: str, job: int = ME):
    chosen, assignments = [], {}
    for index, target in enumerate(targets):
        task = key(f"task_{job}_{index}")
        ti_id = rows.add("(router)@1", state="queued", job=job, task_id=task.task_id)
        assignments[task] = SimpleNamespace(ti_id=ti_id)
        chosen.append((task, None, None, target))
    return chosen, assignments


def test_a_hand_over_takes_no_more_than_the_pool_has_room_for_now(engine):
    rows = Rows(engine)
    children = router_children(limit=3)
    limits = limits_on(engine, children)
    assert children["lambda"].free_slots() == 3  # the estimate: nobody else has runs yet
    rows.add("lambda@1|lambda:fn:req-1:d1")  # meanwhile another scheduler handed two tasks over
    rows.add("lambda@1", state="queued")
    chosen, assignments = chosen_for(children, rows, "lambda", "local", "lambda", "lambda")

    assert hand_over(children, chosen, assignments)
    assert [target for *_, target in chosen] == ["lambda", "local"]  # the other two keep waiting
    stored = rows.external_ids()
    assert [stored[assignments[k].ti_id] for k, *_ in chosen] == ["lambda@1", "local@1"]
    refused = [k for k in assignments if k not in {item[0] for item in chosen}]
    assert [stored[assignments[k].ti_id] for k in refused] == ["(router)@1", "(router)@1"]
    # The count of the hand-over is the estimate's now: the next pass sends them elsewhere.
    children["lambda"].in_flight.add(chosen[0][0])
    assert children["lambda"].free_slots() == 0
    assert limits is children["lambda"].shared_limits


def test_a_child_with_prefetch_holds_that_many_past_the_pools_room_and_learns_the_others_runs(engine):
    """A Lambda child invokes what it holds only as the function has room: the router may hand it ``prefetch``
    tasks past the pool's room, and tells it how many runs the other schedulers have."""
    rows = Rows(engine)
    children = router_children(limit=3)
    lambda_ = children["lambda"]
    lambda_.prefetch = 2
    limits_on(engine, children)
    rows.add("lambda@1|lambda:fn:req-1:d1")  # two runs of another scheduler
    rows.add("lambda@1|lambda:fn:req-2:d2")
    lambda_.in_flight.add(key("mine"))
    assert lambda_.free_slots() == 0 and lambda_.prefetch_slots() == 2
    assert lambda_.executor.others_in_flight == 2
    chosen, assignments = chosen_for(children, rows, "lambda", "lambda", "lambda")
    assert hand_over(children, chosen, assignments)
    assert len(chosen) == 2  # the pool's room (none) and the child's prefetch (2)


def test_hand_overs_to_children_without_a_shared_pool_are_recorded_as_before(engine, monkeypatch):
    recorded = []
    monkeypatch.setattr(
        shared_capacity, "record_hand_overs", lambda hand_overs: recorded.append(hand_overs) or True
    )
    rows = Rows(engine)
    children = router_children()
    limits_on(engine, children)
    chosen, assignments = chosen_for(children, rows, "local")
    engine.queries.clear()
    assert hand_over(children, chosen, assignments)
    assert recorded == [[(assignments[chosen[0][0]].ti_id, "local", 1)]]
    assert engine.queries == []


def test_without_a_scheduler_nothing_is_shared(engine, monkeypatch):
    monkeypatch.setattr(shared_capacity, "record_hand_overs", lambda hand_overs: True)
    children = router_children(job_id=None, limit=2)
    limits_on(engine, children)
    assert children["lambda"].free_slots() == 2  # its max_concurrency alone
    chosen = [
        (key("a"), None, None, "lambda"),
        (key("b"), None, None, "lambda"),
        (key("c"), None, None, "lambda"),
    ]
    assert hand_over(children, chosen, {k: SimpleNamespace(ti_id=k.task_id) for k, *_ in chosen})
    assert len(chosen) == 3 and engine.queries == []


def test_a_function_without_a_known_limit_is_not_shared(engine):
    children = router_children(limit=None)
    limits_on(engine, children)
    assert children["lambda"].free_slots() == 8
    assert engine.queries == []


def test_a_failing_count_leaves_the_childs_own_bounds_and_is_logged_once(engine, caplog):
    clock = FakeClock()
    children = router_children(limit=2)

    @contextmanager
    def broken() -> Iterator[Session]:
        raise RuntimeError("database gone")
        yield  # pragma: no cover

    limits = SharedLimits(children, session=broken, clock=clock, utcnow=lambda: NOW)
    children["lambda"].shared_limits = limits
    with caplog.at_level("INFO", logger=shared_capacity.__name__):
        assert children["lambda"].free_slots() == 2
        clock.now += 1.0
        assert children["lambda"].free_slots() == 2
        limits._session = partial(session_of, engine)
        clock.now += 1.0
        assert children["lambda"].free_slots() == 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Could not count the runs of lambda:fn" in m for m in messages) == 1
    assert any("Counting the runs of lambda:fn across schedulers again" in m for m in messages)


def test_lock_ids_are_stable_signed_32_bit_numbers():
    ids = [lock_id(f"lambda:fn-{n}") for n in range(200)]
    assert all(-(2**31) <= value < 2**31 for value in ids) and min(ids) < 0 < max(ids)
    assert lock_id("lambda:airflow-task") == lock_id("lambda:airflow-task")


def test_two_routers_never_hand_out_more_than_the_limit_together(postgres_url, monkeypatch):
    """Both count the same free slots at once; the pool's lock makes the second count see the first's hand-overs."""
    engine = airflow_engine(postgres_url)
    rows = Rows(engine)
    real_count = shared_capacity.count_runs

    def slow_count(*args: Any, **kwargs: Any) -> dict[str, int]:
        counted = real_count(*args, **kwargs)
        time.sleep(0.5)  # both routers are inside their hand-over at once, whatever the machine's load
        return counted

    monkeypatch.setattr(shared_capacity, "count_runs", slow_count)

    def race(limit: int = 4) -> int:
        routers = []
        for job in (ME, OTHER):
            children = router_children(job_id=job, limit=limit)
            limits_on(engine, children, clock=time.monotonic)
            routers.append((children, *chosen_for(children, rows, *["lambda"] * 3, job=job)))
        start = threading.Barrier(len(routers))

        def hand_over_after_start(children, chosen, assignments):
            start.wait()
            assert hand_over(children, chosen, assignments)

        threads = [threading.Thread(target=hand_over_after_start, args=router) for router in routers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        with engine.begin() as connection:
            handed = connection.execute(
                text("SELECT count(*) FROM task_instance WHERE external_executor_id = 'lambda@1'")
            )
            total = handed.scalar_one()
            connection.execute(text("DELETE FROM task_instance"))
        return total

    try:
        assert race() == 4  # three asked by each, four slots: the second router found one left
        # Without the lock both count four free slots and hand out three each: the lock is what holds the limit.
        monkeypatch.setattr(shared_capacity, "lock_pools", lambda session, keys: None)
        assert race() == 6
    finally:
        engine.dispose()

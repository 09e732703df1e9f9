"""The router with ``fallback`` mapped by reason and a ``run_on`` list: the dead run's reason picks the list."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from airflow.utils.state import TaskInstanceState
from router_fakes import DyingChild, FakeChild

from devtools.workloads import make_workload
from hybrid_router.router import executor as executor_module
from hybrid_router.router.children import Child
from hybrid_router.router.executor import RoutingExecutor
from hybrid_router.router.policy import load_policy

POLICY = """
version: 1
executors:
  lambda: {class: router_fakes.DyingChild, limits: {max_duration: 15m, max_memory_mb: 512}}
  lambda_3g: {class: router_fakes.DyingChild, limits: {max_duration: 15m, max_memory_mb: 3072}}
  local: {class: router_fakes.FakeChild}
defaults: {expected_duration: 1m, memory_mb: 256, run_on: local}
rules:
  - name: sized
    if: {queue: lambda}
    run_on: [lambda, lambda_3g]
    fallback: {out_of_memory: [lambda_3g, local], timeout: [local], default: [local]}
  - name: everything else
    run_on: local
"""


@pytest.fixture
def queued() -> dict:
    """The workloads the test queued, by task instance id: what the fallback's reset hands back."""
    return {}


def fake_children() -> dict[str, Child]:
    fakes = {
        "lambda": DyingChild(label="l"),
        "lambda_3g": DyingChild(label="g"),
        "local": FakeChild(label="o"),
    }
    limits = {"lambda": 512, "lambda_3g": 3072}
    return {name: Child(name, child, max_memory_mb=limits.get(name)) for name, child in fakes.items()}


@pytest.fixture
def fallback_hands_back(monkeypatch, queued) -> None:
    monkeypatch.setattr(executor_module, "redispatch_same_try", lambda ti_id, try_number, *_: queued[ti_id])
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)


@pytest.fixture
def router(write_policy, audit_rows, task_log_folder, fallback_hands_back) -> RoutingExecutor:
    policy = load_policy(write_policy(POLICY))
    executor = RoutingExecutor(parallelism=8, policy=policy, children=fake_children())
    executor.start()
    return executor


def run_until_death(
    router: RoutingExecutor, queued: dict, task_id: str, reason: str, run_id: str = "run"
) -> object:
    item = make_workload(task_id, queue="lambda", run_id=run_id)
    queued[item.ti.id] = item
    router.queue_workload(item, session=None)
    router.heartbeat()
    router.children["lambda"].executor.die(item.ti.key, reason, f"the run died: {reason}")
    router.heartbeat()
    return item


@pytest.mark.parametrize(
    ("reason", "rerun_on"),
    [("out_of_memory", "lambda_3g"), ("timeout", "local"), ("runtime_crash", "local")],
)
def test_the_same_try_goes_where_its_reason_says(router, queued, reason, rerun_on):
    item = run_until_death(router, queued, f"dies_of_{reason}", reason)
    # try 1 still: no retry spent, the run goes on on the executor for that reason
    assert router.get_event_buffer() == {item.ti.key: (TaskInstanceState.QUEUED, f"{rerun_on}@1")}
    assert [w.ti.key for w in router.children[rerun_on].executor.dispatched] == [item.ti.key]


def test_a_second_out_of_memory_goes_on_down_the_list(router, queued):
    item = run_until_death(router, queued, "hog", "out_of_memory")
    router.children["lambda_3g"].executor.die(item.ti.key, "out_of_memory", "again")
    router.heartbeat()
    assert router.get_event_buffer()[item.ti.key] == (TaskInstanceState.QUEUED, "local@1")


def test_the_next_run_goes_to_the_bigger_function_before_the_history_is_read_again(
    write_policy, audit_rows, task_log_folder, fallback_hands_back, queued, tmp_path, monkeypatch
):
    """The router's memory history is read at most once per ``history_cache_ttl`` (5 minutes by default); a
    death the router saw itself counts at once, or a next run within that time would die on `lambda` again."""
    from airflow.models import Log
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import create_engine, event
    from sqlalchemy.orm import Session

    engine = create_engine(f"sqlite:///{tmp_path / 'metadata.db'}")
    TaskInstance.__table__.create(engine)
    Log.__table__.create(engine)
    memory_reads: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        if "FROM log" in statement:
            memory_reads.append(statement)

    event.listen(engine, "before_cursor_execute", count)

    @contextmanager
    def create_session(scoped: bool = True) -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    monkeypatch.setattr("airflow.utils.session.create_session", create_session)
    config = SimpleNamespace(
        policy_file=write_policy(POLICY),
        reload_interval=30.0,
        audit_log=True,
        history_enabled=True,
        history_days=14,
        history_min_runs=3,
        history_cache_ttl=300.0,
    )
    router = RoutingExecutor(parallelism=8, config=config, children=fake_children())
    router.start()

    first = run_until_death(router, queued, "hog", "out_of_memory")
    router.children["lambda_3g"].executor.finish(first.ti.key)
    router.heartbeat()
    # The audit rows are captured (audit_rows), never written: the database cannot be what tells the router.
    following = make_workload("hog", queue="lambda", run_id="next")
    router.queue_workload(following, session=None)
    router.heartbeat()

    dispatched = {
        name: [w.ti.run_id for w in router.children[name].executor.dispatched]
        for name in ("lambda", "lambda_3g")
    }
    assert dispatched == {"lambda": ["run"], "lambda_3g": ["run", "next"]}
    assert len(memory_reads) == 1  # the first decision's read, still within the cache period
    (routed,) = [
        json.loads(row.extra)
        for row in audit_rows
        if row.event == "hybrid_router.routed" and row.run_id == "next"
    ]
    assert (routed["executor"], routed["memory_mb"], routed["memory_source"]) == (
        "lambda_3g",
        513,
        "out_of_memory",
    )
    assert routed["memory_basis"].startswith("more than 512 MB: out of memory on lambda at ")
    engine.dispose()


OVERFLOW_POLICY = """
version: 1
executors:
  lambda: {class: router_fakes.DyingChild, max_concurrency: 1, limits: {max_duration: 15m, max_memory_mb: 512}}
  lambda_1g: {class: router_fakes.DyingChild, limits: {max_duration: 15m, max_memory_mb: 1024}}
  lambda_3g: {class: router_fakes.DyingChild, limits: {max_duration: 15m, max_memory_mb: 3072}}
  local: {class: router_fakes.FakeChild}
defaults: {expected_duration: 1m, memory_mb: 256, run_on: local}
rules:
  - name: small first
    if: {queue: lambda}
    run_on: lambda
    overflow: [lambda_3g]
    fallback: {out_of_memory: [lambda_1g, local], default: [local]}
"""


def test_an_out_of_memory_never_goes_on_to_a_function_no_bigger_than_the_one_it_died_on(
    write_policy, audit_rows, task_log_folder, fallback_hands_back, queued
):
    sizes = {"lambda": 512, "lambda_1g": 1024, "lambda_3g": 3072}
    children = {
        name: Child(
            name,
            DyingChild(label=name),
            max_memory_mb=sizes[name],
            max_concurrency=1 if name == "lambda" else None,
        )
        for name in sizes
    } | {"local": Child("local", FakeChild(label="o"))}
    router = RoutingExecutor(
        parallelism=8, policy=load_policy(write_policy(OVERFLOW_POLICY)), children=children
    )
    router.start()
    first, second = (make_workload(task, queue="lambda") for task in ("fits", "overflows"))
    for item in (first, second):
        queued[item.ti.id] = item
        router.queue_workload(item, session=None)
    router.heartbeat()
    assert [w.ti.key for w in router.children["lambda_3g"].executor.dispatched] == [second.ti.key]
    # Out of memory on 3 GB: the 1 GB function of the list cannot help; the try goes on on local.
    router.children["lambda_3g"].executor.die(second.ti.key, "out_of_memory", "3 GB were not enough")
    router.heartbeat()
    assert router.get_event_buffer()[second.ti.key] == (TaskInstanceState.QUEUED, "local@1")
    # The same death on the 512 MB function goes to the 1 GB one, as the list says.
    router.children["lambda"].executor.die(first.ti.key, "out_of_memory", "512 MB were not enough")
    router.heartbeat()
    assert router.get_event_buffer()[first.ti.key] == (TaskInstanceState.QUEUED, "lambda_1g@1")

"""The executor contract the scheduler relies on, run against a plain fake child and the router over fakes.

Any executor that can stand behind ``[core] executor`` (or be a router's child) should pass it: the scheduler
queues, heartbeats, reads events, asks ``has_task`` and the slot counts, and may revoke.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from airflow.utils.state import TaskInstanceState
from router_fakes import FakeChild

from devtools.workloads import make_workload
from hybrid_router.router.children import Child
from hybrid_router.router.executor import RoutingExecutor
from hybrid_router.router.policy import load_policy_text


@dataclass
class Subject:
    executor: Any
    finish: Callable[[Any, str], None]  # ends a task's run the way the backend would


def plain_child() -> Subject:
    child = FakeChild(parallelism=3)
    child.start()
    return Subject(child, lambda key, state: child.finish(key, state))


def router_over_fakes() -> Subject:
    policy = load_policy_text(
        "version: 1\nexecutors:\n  one: {class: LocalExecutor, max_concurrency: 3}\n"
        "defaults: {expected_duration: 1m, memory_mb: 512, run_on: one}\nrules:\n  - {name: all, run_on: one}\n"
    )
    child = FakeChild(parallelism=3)
    router = RoutingExecutor(policy=policy, children={"one": Child("one", child, max_concurrency=3)})
    router.start()
    return Subject(router, lambda key, state: child.finish(key, state))


@pytest.fixture(params=[plain_child, router_over_fakes], ids=["fake-child", "router"])
def subject(request, audit_rows) -> Subject:
    return request.param()


def test_a_queued_task_is_known_and_takes_a_slot(subject):
    executor = subject.executor
    free = executor.slots_available
    workload = make_workload("t")
    executor.queue_workload(workload, session=None)
    assert executor.has_task(workload.ti)
    assert executor.slots_available == free - 1
    assert executor.slots_occupied == 1


def test_a_task_stays_known_until_its_final_event(subject):
    executor = subject.executor
    free = executor.slots_available
    workload = make_workload("t")
    executor.queue_workload(workload, session=None)
    executor.heartbeat()
    states = [state for state, _ in executor.get_event_buffer().values()]
    assert states[-1] == TaskInstanceState.RUNNING
    assert executor.has_task(workload.ti)
    subject.finish(workload.ti.key, TaskInstanceState.SUCCESS)
    executor.heartbeat()
    assert executor.get_event_buffer() == {workload.ti.key: (TaskInstanceState.SUCCESS, None)}
    assert not executor.has_task(workload.ti)
    assert executor.slots_occupied == 0
    assert executor.slots_available == free


def test_event_buffer_filters_by_dag_id(subject):
    executor = subject.executor
    mine, other = make_workload("t", dag_id="mine"), make_workload("t", dag_id="other")
    executor.queue_workload(mine, session=None)
    executor.queue_workload(other, session=None)
    executor.heartbeat()
    assert set(executor.get_event_buffer(dag_ids=["mine"])) == {mine.ti.key}
    assert set(executor.get_event_buffer()) == {other.ti.key}


def test_revoke_forgets_the_task_and_never_raises(subject):
    executor = subject.executor
    workload = make_workload("t")
    executor.queue_workload(workload, session=None)
    executor.heartbeat()
    executor.revoke_task(ti=workload.ti)
    executor.revoke_task(ti=make_workload("unknown").ti)
    assert not executor.has_task(workload.ti)

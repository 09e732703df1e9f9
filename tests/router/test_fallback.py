"""The conditional reset behind a same-try fallback, on a real (SQLite) task_instance table; next-try routes."""

from __future__ import annotations

import uuid

import pytest
from airflow.models.taskinstance import TaskInstance
from sqlalchemy import select
from sqlalchemy.orm import Session

from devtools.workloads import make_workload
from hybrid_router.router.fallback import NextTryRoute, NextTryRoutes, refresh_queued_dttm, reset_to_queued


def add_ti(session: Session, state: str | None, try_number: int = 1, task_id: str = "t") -> uuid.UUID:
    ti_id = uuid.uuid4()
    session.execute(
        TaskInstance.__table__.insert().values(
            id=ti_id,
            dag_id="d",
            task_id=task_id,
            run_id="r",
            map_index=-1,
            pool="default_pool",
            try_number=try_number,
            state=state,
            queued_dttm=None,
        )
    )
    return ti_id


def row(session: Session, ti_id: uuid.UUID):
    return session.execute(
        select(TaskInstance.__table__.c.state, TaskInstance.__table__.c.queued_dttm).where(
            TaskInstance.__table__.c.id == ti_id
        )
    ).one()


@pytest.mark.parametrize("state", ["running", "queued"])
def test_a_running_or_queued_try_goes_back_to_queued_with_a_new_queued_time(session, state):
    ti_id = add_ti(session, state)
    assert reset_to_queued(session, ti_id, 1) is True
    new_state, queued_dttm = row(session, ti_id)
    assert new_state == "queued" and queued_dttm is not None


@pytest.mark.parametrize("state", ["success", "failed", "up_for_retry", None])
def test_a_try_that_moved_on_is_left_alone(session, state):
    ti_id = add_ti(session, state)
    assert reset_to_queued(session, ti_id, 1) is False
    assert row(session, ti_id) == (state, None)


def test_a_run_that_never_held_the_try_resets_it_only_while_queued(session):
    # Running: another run of the try claimed it; that run keeps it.
    running, queued = add_ti(session, "running"), add_ti(session, "queued", task_id="q")
    assert reset_to_queued(session, running, 1, running_too=False) is False
    assert row(session, running) == ("running", None)
    assert reset_to_queued(session, queued, 1, running_too=False) is True


def external_id(session: Session, ti_id: uuid.UUID, value: str | None = None) -> str | None:
    table = TaskInstance.__table__
    if value is not None:
        session.execute(table.update().where(table.c.id == ti_id).values(external_executor_id=value))
    return session.execute(select(table.c.external_executor_id).where(table.c.id == ti_id)).scalar_one()


def test_the_reset_clears_the_dead_runs_external_id(session):
    # Otherwise a scheduler restart before the fallback child takes the try hands it back to the dead run.
    ti_id = add_ti(session, "running")
    external_id(session, ti_id, "lambda@1|lambda:airflow-task:req-1:d1")
    assert reset_to_queued(session, ti_id, 1) is True
    assert external_id(session, ti_id) is None


def test_a_try_that_moved_on_keeps_its_external_id(session):
    ti_id = add_ti(session, "running", try_number=2)
    external_id(session, ti_id, "local@2|run")
    assert reset_to_queued(session, ti_id, 1) is False
    assert external_id(session, ti_id) == "local@2|run"


def test_another_try_number_is_left_alone(session):
    ti_id = add_ti(session, "running", try_number=2)
    assert reset_to_queued(session, ti_id, 1) is False
    assert row(session, ti_id)[0] == "running"


def test_next_try_route_applies_to_a_later_try_of_the_same_task_only_once():
    routes = NextTryRoutes()
    first = make_workload("t", run_id="r", try_number=1).ti.key
    routes.remember(first, NextTryRoute("local", ("ecs",), failed_on="lambda", reason="timeout"))
    assert routes.take(first) is None  # the failed try itself
    assert routes.take(make_workload("t", run_id="other", try_number=2).ti.key) is None
    route = routes.take(make_workload("t", run_id="r", try_number=2).ti.key)
    assert route == NextTryRoute("local", ("ecs",), failed_on="lambda", reason="timeout")
    assert routes.take(make_workload("t", run_id="r", try_number=3).ti.key) is None


def test_next_try_routes_are_bounded():
    routes = NextTryRoutes(max_entries=2)
    keys = [make_workload(f"t{i}").ti.key for i in range(3)]
    for key in keys:
        routes.remember(key, NextTryRoute("local", (), failed_on="lambda", reason="timeout"))
    assert len(routes) == 2
    assert routes.take(keys[0]._replace(try_number=2)) is None
    assert routes.take(keys[2]._replace(try_number=2)) is not None


def test_refresh_queued_dttm_touches_only_tasks_still_queued(session):
    queued, running = add_ti(session, "queued", task_id="a"), add_ti(session, "running", task_id="b")
    assert refresh_queued_dttm(session, [queued, running]) == 1
    assert row(session, queued)[1] is not None
    assert row(session, running) == ("running", None)

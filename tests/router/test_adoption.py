"""Which tries of a dead scheduler's router the survivor's router holds again, and the hand-over record it relies on."""

from __future__ import annotations

import contextlib
import uuid
from types import SimpleNamespace

import pytest
from airflow.models.taskinstance import TaskInstance
from airflow.utils.state import TaskInstanceState
from sqlalchemy import select

from devtools.workloads import make_workload
from hybrid_router.router.adoption import held_by_router, keep_owned, write_hand_overs
from hybrid_router.router.external_id import parse_external_id

QUEUED, RUNNING = TaskInstanceState.QUEUED, TaskInstanceState.RUNNING


@pytest.mark.parametrize(
    ("state", "external_id", "held"),
    [
        (QUEUED, "(router)@2", True),  # waiting for room in the dead router
        (QUEUED, None, True),  # queued by the dead scheduler, which died before storing any id for it
        (QUEUED, "lambda@1|lambda:fn:req:d1", True),  # try 1's run: try 2 never reached a child
        (QUEUED, "local@2", False),  # handed to a child: that child adopts it, or the scheduler resets it
        (QUEUED, "lambda@2|lambda:fn:-:d2", False),
        (QUEUED, "lambda|lambda:fn:req:d1", False),  # no try: from a version that did not record hand-overs
        (RUNNING, "(router)@2", False),  # a run holds it, whatever the id says
        (RUNNING, None, False),
    ],
)
def test_a_queued_try_with_no_childs_id_for_it_was_held_by_the_router(state, external_id, held):
    ti = SimpleNamespace(key=make_workload("t", try_number=2).ti.key, state=state)
    assert held_by_router(parse_external_id(external_id), ti) is held


def add_ti(session, task_id: str, job_id: int | None = None) -> uuid.UUID:
    ti_id = uuid.uuid4()
    session.execute(
        TaskInstance.__table__.insert().values(
            id=ti_id,
            dag_id="d",
            task_id=task_id,
            run_id="r",
            map_index=-1,
            pool="default_pool",
            try_number=1,
            queued_by_job_id=job_id,
        )
    )
    return ti_id


def test_hand_overs_are_stored_for_each_task_instance(session):
    first, second = add_ti(session, "a"), add_ti(session, "b")
    add_ti(session, "c")
    write_hand_overs(session, [(first, "lambda", 1), (second, "local", 2)])
    write_hand_overs(session, [])
    table = TaskInstance.__table__
    stored = dict(session.execute(select(table.c.task_id, table.c.external_executor_id)).all())
    assert stored == {"a": "lambda@1", "b": "local@2", "c": None}


def test_only_the_tries_this_scheduler_job_still_owns_are_kept_the_others_are_forgotten(session, monkeypatch):
    monkeypatch.setattr(
        "airflow.utils.session.create_session", lambda scoped=True: contextlib.nullcontext(session)
    )
    keys = {name: make_workload(name).ti.key for name in ("mine", "adopted_elsewhere")}
    assignments = {
        keys["mine"]: SimpleNamespace(ti_id=add_ti(session, "mine", job_id=7)),
        keys["adopted_elsewhere"]: SimpleNamespace(ti_id=add_ti(session, "adopted_elsewhere", job_id=8)),
    }
    chosen = [(key, "workload", "pending", "local") for key in keys.values()]
    revoked = []

    kept = keep_owned(chosen, assignments, 7, lambda ti: revoked.append(ti))

    assert kept == [chosen[0]] and revoked == [keys["adopted_elsewhere"]]

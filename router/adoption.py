"""Adoption of a dead or restarted scheduler's task instances: back to the child that runs each, or to wait here.

The child and the try are named in the task instance's ``external_executor_id`` (see ``external_id.py``). The
child is offered the task instance with its own id there, as it wrote it; the router's id is put back afterwards.
An id of another try is never offered: Airflow keeps the id across tries, so a retried try (or one the router
held when the scheduler died) can still carry a previous run's id, and a child handed it would watch a run
that is over.

A try the dead router held itself (waiting for room) was never handed to a child: every hand-over stores the
child's id for the try first (``record_hand_overs``). Such a QUEUED try waits in this router again, with a fresh
workload, and runs once, in the same try. What is adopted neither way the scheduler resets: a new try, under a
new task instance id, which the old run cannot act on (the tries that were on a dead scheduler's
LocalExecutor: Airflow's LocalExecutor cannot adopt them either).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow.utils.state import TaskInstanceState

from hybrid_router.router.external_id import RouterExternalId, join_child_id, parse_external_id

if TYPE_CHECKING:
    from airflow.api_fastapi.auth.tokens import JWTGenerator
    from airflow.executors.workloads import ExecuteTask
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy.orm import Session

    from hybrid_router.router.children import Child

log = logging.getLogger(__name__)


def names_current_try(parsed: RouterExternalId, ti: TaskInstance) -> bool:
    """Whether ``parsed``, the task instance's external id, was written for its current try.

    An id without its try (written by the version before it was recorded) is trusted only while the task
    instance is RUNNING, which only the current try's run makes it: a QUEUED one may be a later try still
    carrying an earlier run's id.
    """
    if parsed.try_number is not None:
        return parsed.try_number == ti.key.try_number
    return ti.state == TaskInstanceState.RUNNING


def held_by_router(parsed: RouterExternalId | None, ti: TaskInstance) -> bool:
    """Whether the router that queued this try still held it: QUEUED, and no child's id for this try stored.

    That is the router's own id for the try, no id, or another try's id. An id without its try was written by
    a version that did not record hand-overs first: whether that try reached a child is unknown.
    """
    if ti.state != TaskInstanceState.QUEUED:
        return False
    if parsed is None:
        return True
    if parsed.try_number is None:
        return False
    return parsed.child is None or parsed.try_number != ti.key.try_number


class Offered(NamedTuple):
    """What became of the task instances of a dead scheduler offered to this router."""

    adopted: list[tuple[TaskInstance, Child]]  # each taken by the child that runs it
    held: list[TaskInstance]  # tries the dead router held, to wait in this one
    not_adopted: list[TaskInstance]  # for the scheduler to reset


def offer_to_children(children: Mapping[str, Child], tis: Sequence[TaskInstance]) -> Offered:
    """Sort the task instances: those a child took (with that child), those held by the router, the rest.

    Not offered to any child (so held, or reset by the scheduler as any executor's task it cannot adopt): a
    task instance whose id names no child of this router, or names the run of another try. A child that raises
    adopts none of its task instances.
    """
    by_child: dict[str, list[tuple[TaskInstance, str]]] = {}
    held: list[TaskInstance] = []
    not_adopted: list[TaskInstance] = []
    for ti in tis:
        parsed = parse_external_id(ti.external_executor_id)
        if held_by_router(parsed, ti):
            held.append(ti)
            continue
        if parsed is None or parsed.child not in children:
            not_adopted.append(ti)
            continue
        if not names_current_try(parsed, ti):
            log.info(
                "Not adopting %s (%s): its external id %r may name another try's run on %s",
                ti.key,
                ti.state,
                ti.external_executor_id,
                parsed.child,
            )
            not_adopted.append(ti)
            continue
        by_child.setdefault(parsed.child, []).append((ti, ti.external_executor_id))
        ti.external_executor_id = parsed.child_info
    adopted: list[tuple[TaskInstance, Child]] = []
    for name, items in by_child.items():
        child = children[name]
        offered = [ti for ti, _ in items]
        try:
            refused = {id(ti) for ti in child.executor.try_adopt_task_instances(offered)}
        except Exception:
            log.exception("Child executor %s failed to adopt task instances", name)
            refused = {id(ti) for ti in offered}
        for ti, original in items:
            ti.external_executor_id = original
            if id(ti) in refused:
                not_adopted.append(ti)
            else:
                adopted.append((ti, child))
    return Offered(adopted, held, not_adopted)


def queue_again(
    tis: Sequence[TaskInstance],
    generator: JWTGenerator,
    queue: Callable[[ExecuteTask, Session], None],
) -> list[TaskInstance]:
    """Hand ``queue`` a fresh workload (a new token) of each held try; returns those it could not rebuild.

    The rows are read in a session of their own: the scheduler's adoption transaction holds their locks, so
    nothing here may write them. The stuck-in-queued clock restarts on the scheduler's own objects instead,
    committed with the adoption.
    """
    from airflow._shared.timezones import timezone
    from airflow.utils.session import create_session

    from hybrid_router.router.fallback import fresh_workload

    queued: set[int] = set()
    try:
        with create_session(scoped=False) as session:
            for ti in tis:
                workload = fresh_workload(session, ti.id, generator)
                if workload is None:
                    continue
                queue(workload, session)
                ti.queued_dttm = timezone.utcnow()
                queued.add(id(ti))
    except Exception:
        log.exception("Could not queue again the tries a dead scheduler's router held; they are reset")
    if queued:
        log.info("%d tries a dead scheduler's router held wait in this one again", len(queued))
    return [ti for ti in tis if id(ti) not in queued]


def write_hand_overs(session: Session, hand_overs: Iterable[tuple[Any, str, int]]) -> None:
    """Store ``<child>@<try>`` for each ``(task instance id, child, try number)``, in ``session``."""
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import bindparam, update

    table = TaskInstance.__table__
    rows = [
        {"ti_id": ti_id, "external_id": join_child_id(child, None, try_number=try_number)}
        for ti_id, child, try_number in hand_overs
    ]
    if rows:
        session.execute(
            update(table)
            .where(table.c.id == bindparam("ti_id"))
            .values(external_executor_id=bindparam("external_id")),
            rows,
        )


def record_hand_overs(hand_overs: Sequence[tuple[Any, str, int]]) -> bool:
    """Commit which child each try goes to before any child is given one; False (and logged) if that failed.

    Only then can a scheduler that adopts this one's task instances tell a try a child may be running from
    one the router held (``held_by_router``): running a handed-over try again could start it twice.
    """
    from airflow.utils.session import create_session

    try:
        with create_session(scoped=False) as session:
            write_hand_overs(session, hand_overs)
    except Exception:
        log.exception(
            "Could not record which child takes %d tasks; they wait for the next heartbeat", len(hand_overs)
        )
        return False
    return True


def keep_owned(
    chosen: Sequence[tuple[Any, ...]],
    assignments: Mapping[Any, Any],
    job_id: int,
    revoke: Callable[..., None],
) -> list[tuple[Any, ...]] | None:
    """The items of ``chosen`` (``(key, ..., child)``, their hand-overs just committed) whose task instance
    scheduler job ``job_id`` still owns (``queued_by_job_id``); the router forgets the others (``revoke``, its
    ``revoke_task``). None if the database could not say (logged).

    A scheduler that stalled past the health threshold counts as dead and may find on waking that another one
    adopted tries it held. Read after the hand-overs' commit, this sees every adoption that came first; one that
    comes later finds the hand-over and leaves the try to the child named there. Either way one scheduler runs it.
    """
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    table = TaskInstance.__table__
    ids = {assignments[item[0]].ti_id for item in chosen}
    try:
        with create_session(scoped=False) as session:
            owned = set(
                session.scalars(
                    select(table.c.id).where(table.c.id.in_(ids), table.c.queued_by_job_id == job_id)
                )
            )
    except Exception:
        log.exception("Could not check that %d tasks are still this scheduler's; they wait", len(chosen))
        return None
    kept = [item for item in chosen if assignments[item[0]].ti_id in owned]
    lost = [item[0] for item in chosen if assignments[item[0]].ti_id not in owned]
    if lost:
        log.warning(
            "Another scheduler adopted %d tasks waiting here while this one counted as dead; it runs them: %s",
            len(lost),
            ", ".join(str(key) for key in lost),
        )
    for key in lost:
        revoke(ti=key)  # a key stands for its task instance (``TaskInstanceKey.key``)
    return kept

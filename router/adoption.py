"""Adoption after a scheduler restart: each running task instance goes back to the child that ran it.

The child and the try are named in the task instance's ``external_executor_id`` (see ``external_id.py``). The
child is offered the task instance with its own id there, as it wrote it; the router's id is put back afterwards.
An id of another try is never offered: Airflow keeps the id across tries, so a retried try (or one the router
held when the scheduler died) can still carry a previous run's id, and a child handed it would watch a run
that is over. What is not adopted the scheduler resets: a new try, under a new task instance id, which the old
run cannot act on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from airflow.utils.state import TaskInstanceState

from hybrid_router.router.external_id import RouterExternalId, parse_external_id

if TYPE_CHECKING:
    from airflow.models.taskinstance import TaskInstance

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


def offer_to_children(
    children: Mapping[str, Child], tis: Sequence[TaskInstance]
) -> tuple[list[tuple[TaskInstance, Child]], list[TaskInstance]]:
    """``(adopted, not_adopted)``: each task instance a child took, with that child, and the rest.

    Not offered to any child (so reset by the scheduler, as any executor's task it cannot adopt): a task
    instance whose id names no child of this router, or names the run of another try. A child that raises
    adopts none of its task instances.
    """
    by_child: dict[str, list[tuple[TaskInstance, str]]] = {}
    not_adopted: list[TaskInstance] = []
    for ti in tis:
        parsed = parse_external_id(ti.external_executor_id)
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
    return adopted, not_adopted

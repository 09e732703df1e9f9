"""Adoption after a scheduler restart: each running task instance goes back to the child that ran it.

The child is named at the front of the task instance's ``external_executor_id`` (see ``external_id.py``). It
is offered the task instance with its own id there, as it wrote it; the router's id is put back afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hybrid_router.router.external_id import split_child_id

if TYPE_CHECKING:
    from airflow.models.taskinstance import TaskInstance

    from hybrid_router.router.children import Child

log = logging.getLogger(__name__)


def offer_to_children(
    children: Mapping[str, Child], tis: Sequence[TaskInstance]
) -> tuple[list[tuple[TaskInstance, Child]], list[TaskInstance]]:
    """``(adopted, not_adopted)``: each task instance a child took, with that child, and the rest.

    A child that raises adopts none of its task instances: the scheduler then resets them as it would for an
    executor that adopts nothing.
    """
    by_child: dict[str, list[tuple[TaskInstance, str]]] = {}
    not_adopted: list[TaskInstance] = []
    for ti in tis:
        name, child_info = split_child_id(ti.external_executor_id)
        if name in children:
            by_child.setdefault(name, []).append((ti, ti.external_executor_id))
            ti.external_executor_id = child_info
        else:
            not_adopted.append(ti)
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

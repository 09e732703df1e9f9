"""Re-running a try elsewhere after its first run died for infrastructure reasons.

``same_try`` (the default) hands the same try to another executor without spending one of the task's retries.
That takes two database steps, both here:

1. A conditional reset of the task instance to QUEUED. The new worker's ``/run`` call is refused (409) unless
   the task is QUEUED, ``queued_dttm`` restarts the scheduler's stuck-in-queued clock, and the external id of
   the dead run is cleared. The ``WHERE`` makes
   it a no-op when anything else moved the task meanwhile (a user marked it, another scheduler took it over, a
   newer try exists): then the router does not touch it.
2. A fresh workload built from the reloaded row, with a new execution-API token: the first workload's token
   may be older than its ``task_queued_timeout`` lifetime by now (an async Lambda event can wait for hours).

``next_try`` fails the try as usual and sends the task's next try to the fallback executor; the router only
has to remember where that next try goes.

Which of these happens to a dead run is decided by ``decide_fallback``, a pure function; the executor carries
the decision out.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybrid_router.router.policy.model import fallback_for_reason

if TYPE_CHECKING:
    from uuid import UUID

    from airflow.api_fastapi.auth.tokens import JWTGenerator
    from airflow.executors.workloads import ExecuteTask
    from airflow.models.taskinstancekey import TaskInstanceKey
    from sqlalchemy.orm import Session

    from hybrid_router.child_protocol import InfrastructureFailure
    from hybrid_router.router.policy.model import FallbackMode

log = logging.getLogger(__name__)

SAME_TRY = "same_try"
NEXT_TRY = "next_try"
# States from which a dead run's try may be handed over: RUNNING once its worker called /run, QUEUED when it
# died before that.
RESETTABLE_STATES = ("running", "queued")


# -- the decision --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NextTryRoute:
    """Where the next try of a task goes after an infrastructure failure, and why."""

    executor: str
    remaining: tuple[str, ...]
    failed_on: str
    reason: str


class ExhaustedCause(enum.Enum):
    NO_FALLBACK_LEFT = "no_fallback_left"  # every fallback executor was tried, or none is configured
    MAX_FALLBACKS_REACHED = "max_fallbacks_reached"


@dataclass(frozen=True)
class RerunSameTry:
    """Reset the try to QUEUED and hand it to the first of ``candidates`` with room; hold its FAILED back."""

    candidates: tuple[str, ...]


@dataclass(frozen=True)
class RouteNextTry:
    """Let the try fail as reported and send the task's next try to ``route.executor``."""

    route: NextTryRoute


@dataclass(frozen=True)
class FallbacksExhausted:
    """No fallback is left for this try: it fails as reported, and people are told why."""

    cause: ExhaustedCause
    max_fallbacks: int


@dataclass(frozen=True)
class NothingToDo:
    """The try fails as reported, nothing to remember: ``next_try`` mode with no fallback executor left."""


FallbackDecision = RerunSameTry | RouteNextTry | FallbacksExhausted | NothingToDo


def decide_fallback(
    failure: InfrastructureFailure,
    *,
    failed_on: str,
    fallback: Sequence[str] | Mapping[str, Sequence[str]],
    tried: Collection[str],
    fallbacks_used: int,
    available: Collection[str],
    mode: FallbackMode,
    max_fallbacks: int,
) -> FallbackDecision:
    """What to do with a try whose run on ``failed_on`` died for infrastructure reasons.

    ``fallback`` is the policy's fallback list for the task, or its lists by failure reason
    (``Decision.fallback_lists()``), of which the one for ``failure.reason`` applies; only executors in
    ``available`` (the router's children) that are not in ``tried`` (every executor a run of this try was
    handed to) are candidates.
    ``max_fallbacks`` bounds same-try re-runs only: in ``next_try`` mode each fallback spends one of the
    task's retries, which Airflow bounds already.
    """
    if isinstance(fallback, Mapping):
        fallback = fallback_for_reason(fallback, failure.reason)
    remaining = tuple(name for name in fallback if name in available and name not in tried)
    if mode == NEXT_TRY:
        if not remaining:
            return NothingToDo()
        return RouteNextTry(
            NextTryRoute(remaining[0], remaining[1:], failed_on=failed_on, reason=failure.reason)
        )
    if not remaining:
        return FallbacksExhausted(ExhaustedCause.NO_FALLBACK_LEFT, max_fallbacks)
    if fallbacks_used >= max_fallbacks:
        return FallbacksExhausted(ExhaustedCause.MAX_FALLBACKS_REACHED, max_fallbacks)
    return RerunSameTry(remaining)


# -- where next tries go -------------------------------------------------------------------------------------


class NextTryRoutes:
    """Remembers, per (dag_id, task_id, run_id, map_index), the executor for a task's next try.

    Bounded (oldest forgotten first): a task whose next try never comes (no retries left, run cleared) must
    not keep an entry for the life of the scheduler.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self._routes: OrderedDict[tuple[str, str, str, int], tuple[int, NextTryRoute]] = OrderedDict()
        self._max_entries = max_entries

    def __len__(self) -> int:
        return len(self._routes)

    def remember(self, key: TaskInstanceKey, route: NextTryRoute) -> None:
        self._routes[key.primary] = (key.try_number, route)
        self._routes.move_to_end(key.primary)
        while len(self._routes) > self._max_entries:
            self._routes.popitem(last=False)

    def take(self, key: TaskInstanceKey) -> NextTryRoute | None:
        """The route for ``key`` if it is a later try than the one that failed; consumed when returned."""
        entry = self._routes.get(key.primary)
        if entry is None:
            return None
        failed_try, route = entry
        if key.try_number <= failed_try:
            return None
        del self._routes[key.primary]
        return route


# -- database steps, each one conditional statement ----------------------------------------------------------


def reset_to_queued(session: Session, ti_id: UUID | str, try_number: int, running_too: bool = True) -> bool:
    """Move the try back to QUEUED if, and only if, it is still this try and still running or queued (only
    queued when not ``running_too``: a run that never held the try must not take it from the run that does).

    The external id is cleared with it: it names the dead run, and a scheduler restart before the next child
    takes the try must not hand the try back to that run (``adoption.py``).
    """
    from airflow._shared.timezones import timezone
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import update

    result = session.execute(
        update(TaskInstance)
        .where(
            TaskInstance.id == ti_id,
            TaskInstance.try_number == try_number,
            TaskInstance.state.in_(RESETTABLE_STATES if running_too else ("queued",)),
        )
        .values(state="queued", queued_dttm=timezone.utcnow(), external_executor_id=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def refresh_queued_dttm(session: Session, ti_ids: list[Any]) -> int:
    """Restart the stuck-in-queued clock of tasks that are still QUEUED and only wait for room."""
    from airflow._shared.timezones import timezone
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import update

    result = session.execute(
        update(TaskInstance)
        .where(TaskInstance.id.in_(ti_ids), TaskInstance.state == "queued")
        .values(queued_dttm=timezone.utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def fresh_workload(session: Session, ti_id: UUID | str, generator: JWTGenerator) -> ExecuteTask | None:
    """A new ``ExecuteTask`` for the task instance's current row, with a new token; None if the row is gone."""
    from airflow.executors.workloads import ExecuteTask
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select
    from sqlalchemy.orm import joinedload

    ti = session.scalar(
        select(TaskInstance)
        .where(TaskInstance.id == ti_id)
        .options(
            joinedload(TaskInstance.dag_run).joinedload(DagRun.dag_model), joinedload(TaskInstance.dag_model)
        )
    )
    if ti is None:
        return None
    return ExecuteTask.make(ti, generator=generator)


def redispatch_same_try(
    ti_id: UUID | str, try_number: int, generator: JWTGenerator, running_too: bool = True
) -> ExecuteTask | None:
    """Reset and rebuild in one transaction; None when the conditional reset matched no row."""
    from airflow.utils.session import create_session

    with create_session(scoped=False) as session:
        if not reset_to_queued(session, ti_id, try_number, running_too):
            session.rollback()
            return None
        workload = fresh_workload(session, ti_id, generator)
        if workload is None:
            session.rollback()
        return workload

"""How long each executor takes to start a task, from the router's own records of which child ran each try.

When the router hands a try to a child it writes an audit row (``hybrid_router.routed``, or
``hybrid_router.fallback`` for the same try re-dispatched) whose ``extra.executor`` names the child; the row's
``dttm`` is the moment of the hand-over. The task instance's ``start_date`` is when the run began on its worker
(every run of a try sets it again, so after a fallback it is the last run's; a run resumed after deferral keeps
it). A try's start latency is its ``start_date`` less the ``dttm`` of the last hand-over before it.
``TaskInstance.executor`` cannot say which child ran a try: it names the router.

An executor without such records gets an assumed figure, by its class, which every report names as assumed:

=============  =====  ===========================================================================================
class          s      why
=============  =====  ===========================================================================================
Lambda         1      a warm invoke takes tens of ms; the result's trip through SQS and the odd cold start add up
                      to about a second
ECS, Batch     60     Fargate's RunTask to RUNNING is published at 53-62 s for a 413 MB image (no image cache)
Kubernetes     15     a pod to schedule and start, its image cached on the node
Celery         1      a worker already running takes the message
Local          0.5    a worker process already running forks the task
anything else  5      no figure known
=============  =====  ===========================================================================================
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from hybrid_router.router.audit import AUDIT_OWNER, EVENT_FALLBACK, EVENT_ROUTED

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from hybrid_router.router.policy import ExecutorSpec

DISPATCH_EVENTS = (EVENT_ROUTED, EVENT_FALLBACK)
# by the lower-cased class name's first matching word; see the module docstring
ASSUMED_START_LATENCY_S: tuple[tuple[str, float], ...] = (
    ("lambda", 1.0),
    ("ecs", 60.0),
    ("batch", 60.0),
    ("kubernetes", 15.0),
    ("celery", 1.0),
    ("local", 0.5),
)
OTHER_START_LATENCY_S = 5.0
# A worker's clock a little behind the scheduler's must not pair a run with an earlier hand-over.
CLOCK_SKEW = timedelta(seconds=2)
MEASURED = "measured"
ASSUMED = "assumed"


@dataclass(frozen=True)
class StartLatency:
    seconds: float  # the mean over ``samples`` tries, or the assumed figure
    source: str  # MEASURED or ASSUMED
    samples: int = 0

    def describe(self) -> str:
        if self.source == MEASURED:
            return f"{self.seconds:.2f} s, mean of {self.samples} measured start(s)"
        return f"{self.seconds:g} s assumed (no measured start)"


def assumed_start_latency(spec: ExecutorSpec) -> float:
    name = spec.class_path.rpartition(".")[2].lower()
    return next((seconds for word, seconds in ASSUMED_START_LATENCY_S if word in name), OTHER_START_LATENCY_S)


@dataclass(frozen=True)
class StartLatencies:
    """Measured start latencies by child name; ``of`` answers for any executor, measured or assumed."""

    measured: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def of(self, spec: ExecutorSpec) -> StartLatency:
        samples = self.measured.get(spec.name, ())
        if samples:
            return StartLatency(math.fsum(samples) / len(samples), MEASURED, len(samples))
        return StartLatency(assumed_start_latency(spec), ASSUMED)


def _dispatch_query(since: datetime) -> Any:
    from airflow.models import Log
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from sqlalchemy import and_, select, union_all

    def with_start_of(table: Any) -> Any:
        # each join uses the table's unique key; earlier tries of a cleared task are in task_instance_history
        return (
            select(
                Log.dag_id,
                Log.task_id,
                Log.run_id,
                Log.map_index,
                Log.try_number,
                Log.dttm,
                Log.extra,
                table.start_date,
            )
            .join(
                table,
                and_(
                    table.dag_id == Log.dag_id,
                    table.task_id == Log.task_id,
                    table.run_id == Log.run_id,
                    table.map_index == Log.map_index,
                    table.try_number == Log.try_number,
                ),
            )
            .where(Log.event.in_(DISPATCH_EVENTS), Log.owner == AUDIT_OWNER, Log.dttm >= since)
        )

    return union_all(with_start_of(TaskInstance), with_start_of(TaskInstanceHistory))


def start_latencies_of(rows: Any) -> StartLatencies:
    """Pair each try's hand-overs (dag_id, task_id, run_id, map_index, try_number, dttm, extra, start_date)."""
    tries: dict[tuple[Any, ...], list[tuple[datetime, str, datetime]]] = defaultdict(list)
    for dag_id, task_id, run_id, map_index, try_number, at, extra, start in rows:
        executor = _executor(extra)
        if executor and at is not None and start is not None:
            tries[(dag_id, task_id, run_id, map_index, try_number)].append((_utc(at), executor, _utc(start)))
    measured: dict[str, list[float]] = defaultdict(list)
    for handovers in tries.values():
        start = handovers[0][2]
        before = [handover for handover in handovers if handover[0] <= start + CLOCK_SKEW]
        if before:
            at, executor, _ = max(before)
            measured[executor].append(max(0.0, (start - at).total_seconds()))
    return StartLatencies({name: tuple(values) for name, values in measured.items()})


def read_start_latencies(session: Session, *, days: float, now: datetime | None = None) -> StartLatencies:
    """The start latencies of the tries handed over in the last ``days`` days, with one query."""
    since = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    return start_latencies_of(session.execute(_dispatch_query(since)))


def _executor(extra: str | None) -> str | None:
    try:
        data = json.loads(extra or "")
    except ValueError:
        return None
    executor = data.get("executor") if isinstance(data, dict) else None
    return executor if isinstance(executor, str) and executor else None


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

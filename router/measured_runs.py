"""What each finished run used, kept in Airflow's own audit log, and the cached reader of the memory it measured.

Writing. For every run a child reports finished (a final state, or a death that hands the try to a fallback)
the router writes one ``hybrid_router.run_finished`` row to the ``log`` table: the task instance's key in its
columns (dag_id, task_id, run_id, map_index, try_number), ``owner`` ``hybrid_router``, and in ``extra`` (JSON):

==================  ==============================================================================================
``executor``        the child that ran it, by its name in the policy
``outcome``         ``success`` or ``failed`` as its task instance ended (a child's own event says only that the
                    workload ended), or the infrastructure reason it died of (``out_of_memory``, ``timeout``,
                    ... as ``child_protocol.InfrastructureFailure.reason``)
``memory_size_mb``  the memory size it ran with (a Lambda function's); null when unknown
``peak_mb``         its peak memory as its child measured it; null where it could not
``duration_ms``     how long it ran; null when unknown
``billed_ms``       Lambda's billed duration (rounded up to 1 ms); null on other children
==================  ==============================================================================================

What each child gives:

- a Lambda child (``LambdaExecutor``): every figure, from its handler's final result (Lambda's ``REPORT``
  figures; the peak is the sandbox's process tree, a page shared in it counted once). A run Lambda killed
  sends no result: its row has the function's memory size (as Lambda describes the function) and no durations,
  and one that ran out of memory has that size as its peak too, as Lambda's ``REPORT`` line gives it (the
  child's ``limits.max_memory_mb`` stands in when the executor could not ask Lambda);
- any other child (LocalExecutor, ECS, ...): the duration of a run that ended ``success`` or ``failed``, from
  its task instance's start and end (worker time, as ``history.worker_seconds`` counts it), read for all such
  runs of a heartbeat with one query; no memory, unless the child offers ``ReportsRunMeasurements``.

These rows need no table of the project's own (which would need ``[database] external_db_managers``) and no
migration, and are the same on SQLite and PostgreSQL. They are written whatever ``[hybrid_router] audit_log``
says: they are what the router learns from.

Reading. ``TaskMemoryHistory`` reads the rows of the last ``days`` with one query, at most once per ``ttl``
(``history.CachedRead``), and answers per task from memory: never a query per routing decision. The router's
own out-of-memory deaths count from the moment it sees them (``RunRecorder`` tells the history), not from its
next read: the task's next run goes to a bigger function even when it comes within ``ttl``. Another scheduler's
router learns them at its next read.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import TYPE_CHECKING, Any

from hybrid_router.child_protocol import RunMeasurement
from hybrid_router.router.audit import AUDIT_OWNER, EVENT_RUN_FINISHED
from hybrid_router.router.history import CachedRead, SessionFactory, TaskKey, percentile, worker_seconds
from hybrid_router.router.policy.facts import MemoryEvidence, MemoryLookup, OutOfMemory

if TYPE_CHECKING:
    from airflow.models.taskinstancekey import TaskInstanceKey
    from sqlalchemy.orm import Session

    from hybrid_router.child_protocol import InfrastructureFailure
    from hybrid_router.router.audit import AuditLog
    from hybrid_router.router.children import Child

log = logging.getLogger(__name__)

OUT_OF_MEMORY = "out_of_memory"
# Tasks whose out-of-memory death a router keeps in memory until its reads of the database have them.
MAX_NOTED_DEATHS = 10_000
# Runs that ended by themselves: their task instance's state, start and end are theirs.
_ENDED_BY_THEMSELVES = ("success", "failed")
# A child's event says that the workload ended, not how the task did: Airflow's task runner exits 0 after a task
# that failed (it reports the failure to the API server), so LocalExecutor and the Lambda handler report success
# for it. The task instance's state says, once it is final for the try.
_OUTCOME_OF_STATE = {"success": "success", "failed": "failed", "up_for_retry": "failed"}


@dataclass(eq=False)
class _PendingRow:
    key: TaskInstanceKey
    ti_id: Any
    row: dict[str, Any]  # ``extra`` of its row, its duration still to be found when None


class RunRecorder:
    """Turns the runs the router saw finish into audit rows, handed to ``audit_log`` at each ``flush``."""

    def __init__(
        self,
        audit_log: AuditLog,
        session_factory: SessionFactory | None = None,
        memory_history: TaskMemoryHistory | None = None,
    ) -> None:
        self._audit = audit_log
        self._session_factory = session_factory
        self.memory_history = memory_history  # told of each out-of-memory death at once
        self._pending: list[_PendingRow] = []
        self._read_failed = False

    def finished(
        self,
        key: TaskInstanceKey,
        child: Child,
        ti_id: Any,
        state: Any,
        failure: InfrastructureFailure | None,
    ) -> None:
        """Note the run of ``key`` on ``child`` that ended in ``state`` (dying of ``failure``, if it did)."""
        outcome = failure.reason if failure is not None else str(getattr(state, "value", state))
        row = _row(child, outcome, child.pop_run_measurement(key))
        self._pending.append(_PendingRow(key, ti_id, row))
        if outcome == OUT_OF_MEMORY and self.memory_history is not None:
            death = OutOfMemoryRun(child.name, row["memory_size_mb"], datetime.now(timezone.utc))
            self.memory_history.note_out_of_memory(key.dag_id, key.task_id, death)

    def flush(self) -> int:
        """Hand the audit log a row for every run noted since the last flush; returns how many."""
        runs, self._pending = self._pending, []
        ended = [run for run in runs if run.row["outcome"] in _ENDED_BY_THEMSELVES]
        found = self._task_instances(ended) if ended else {}
        for run in runs:
            outcome, worked_ms = found.get(run, (None, None))
            if outcome is not None:
                run.row["outcome"] = outcome
            if run.row["duration_ms"] is None and worked_ms is not None:
                run.row["duration_ms"] = worked_ms
            self._audit.record(EVENT_RUN_FINISHED, run.key, **run.row)
        return len(runs)

    def _task_instances(
        self, runs: Sequence[_PendingRow]
    ) -> dict[_PendingRow, tuple[str | None, int | None]]:
        """How each run's task ended and how long it occupied its worker, from its task instance's row (when the
        row is still that run's try): one query for all of them."""
        from airflow.models.taskinstance import TaskInstance
        from sqlalchemy import select

        query = select(
            TaskInstance.id,
            TaskInstance.try_number,
            TaskInstance.state,
            TaskInstance.start_date,
            TaskInstance.end_date,
            TaskInstance.queued_dttm,
        ).where(TaskInstance.id.in_({run.ti_id for run in runs}))
        try:
            with self._sessions()() as session:
                found = {row[0]: row[1:] for row in session.execute(query)}
        except Exception as error:
            # The rows go as their children reported them, without durations, rather than not at all; said once
            # per outage.
            if not self._read_failed:
                log.warning("Could not read the task instances of finished runs: %s", error)
            self._read_failed = True
            return {}
        self._read_failed = False
        ended: dict[_PendingRow, tuple[str | None, int | None]] = {}
        for run in runs:
            try_number, state, start, end, queued = found.get(run.ti_id, (None,) * 5)
            if try_number != run.key.try_number:
                continue
            seconds = worker_seconds(start, end, queued)
            state = str(getattr(state, "value", state))
            ended[run] = (_OUTCOME_OF_STATE.get(state), None if seconds is None else round(seconds * 1000))
        return ended

    def _sessions(self) -> SessionFactory:
        if self._session_factory is None:
            from airflow.utils.session import create_session

            # Never the scheduler's scoped session: this must not commit or close the scheduler's work.
            self._session_factory = partial(create_session, scoped=False)
        return self._session_factory


def _row(child: Child, outcome: str, measured: RunMeasurement | None) -> dict[str, Any]:
    measured = measured or RunMeasurement()
    row: dict[str, Any] = {
        "executor": child.name,
        "outcome": outcome,
        "memory_size_mb": measured.memory_size_mb,
        "peak_mb": measured.peak_memory_mb,
        "duration_ms": None if measured.duration_ms is None else round(measured.duration_ms),
        "billed_ms": measured.billed_duration_ms,
    }
    if outcome == OUT_OF_MEMORY and row["peak_mb"] is None:
        # Killed with no result of its own: Lambda's REPORT gives the memory size as the peak of such a run.
        row["memory_size_mb"] = row["peak_mb"] = measured.memory_size_mb or child.max_memory_mb
    return row


# -- reading --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedRun:
    """One ``hybrid_router.run_finished`` row, read back."""

    dag_id: str
    task_id: str
    at: datetime  # when the router saw the run end (the row's ``dttm``, UTC)
    executor: str
    outcome: str
    memory_size_mb: int | None
    peak_mb: int | None
    duration_ms: int | None
    billed_ms: int | None


@dataclass(frozen=True)
class OutOfMemoryRun:
    """A run that ran out of memory: the task needs more than ``memory_size_mb``."""

    executor: str  # the child it ran on, by its name in the policy
    memory_size_mb: int | None  # None only when neither the child nor the policy said the function's size
    at: datetime


@dataclass(frozen=True)
class TaskMemory:
    """What the finished runs of one task in the look-back window say about its memory. Hashable."""

    dag_id: str
    task_id: str
    # The measured peaks of its runs that did not run out of memory, oldest first, and their p95 (None without).
    peaks_mb: tuple[int, ...]
    p95_peak_mb: float | None
    out_of_memory: tuple[OutOfMemoryRun, ...]  # oldest first

    @property
    def latest_out_of_memory(self) -> OutOfMemoryRun | None:
        return self.out_of_memory[-1] if self.out_of_memory else None

    @property
    def largest_out_of_memory(self) -> OutOfMemoryRun | None:
        """The death on the largest memory size (the latest of equals): the most the task is known to need."""
        sized = [run for run in self.out_of_memory if run.memory_size_mb is not None]
        return max(reversed(sized), key=lambda run: run.memory_size_mb or 0, default=None)


def _finished_runs_query(since: datetime, where: Sequence[Any] = ()) -> Any:
    from airflow.models import Log
    from sqlalchemy import select

    return (
        select(Log.dag_id, Log.task_id, Log.dttm, Log.extra)
        .where(Log.event == EVENT_RUN_FINISHED, Log.owner == AUDIT_OWNER, Log.dttm >= since, *where)
        .order_by(Log.dttm, Log.id)
    )


def read_finished_runs(
    session: Session, *, days: float, now: datetime | None = None, where: Sequence[Any] = ()
) -> list[FinishedRun]:
    """The runs that finished in the last ``days`` days, oldest first, with one query; ``where`` narrows it
    (clauses on Airflow's ``Log``: the Routing page's DAG scope and search)."""
    since = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    query = _finished_runs_query(since, where)
    return [run for row in session.execute(query) if (run := _parse(*row)) is not None]


def _parse(
    dag_id: str | None, task_id: str | None, at: datetime | None, extra: str | None
) -> FinishedRun | None:
    try:
        data = json.loads(extra or "")
    except ValueError:
        return None
    if not (dag_id and task_id and at and isinstance(data, dict)):
        return None
    return FinishedRun(
        dag_id=dag_id,
        task_id=task_id,
        at=at if at.tzinfo else at.replace(tzinfo=timezone.utc),
        executor=str(data.get("executor") or ""),
        outcome=str(data.get("outcome") or ""),
        memory_size_mb=_whole(data.get("memory_size_mb")),
        peak_mb=_whole(data.get("peak_mb")),
        duration_ms=_whole(data.get("duration_ms")),
        billed_ms=_whole(data.get("billed_ms")),
    )


def _whole(value: Any) -> int | None:
    """A figure of a row, if it is one (a row is text anyone with database access could have written)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        return None
    return int(value)


def summarise_memory(runs: Iterable[FinishedRun]) -> dict[TaskKey, TaskMemory]:
    """Each task's memory evidence from its finished runs (given oldest first)."""
    peaks: dict[TaskKey, list[int]] = defaultdict(list)
    deaths: dict[TaskKey, list[OutOfMemoryRun]] = defaultdict(list)
    for run in runs:
        key = (run.dag_id, run.task_id)
        if run.outcome == OUT_OF_MEMORY:
            deaths[key].append(OutOfMemoryRun(run.executor, run.memory_size_mb, run.at))
        elif run.peak_mb is not None:
            peaks[key].append(run.peak_mb)
    return {
        key: TaskMemory(
            dag_id=key[0],
            task_id=key[1],
            peaks_mb=tuple(peaks[key]),
            p95_peak_mb=percentile(sorted(peaks[key]), 0.95) if peaks[key] else None,
            out_of_memory=tuple(deaths[key]),
        )
        for key in peaks.keys() | deaths.keys()
    }


def read_task_memory(session: Session, *, days: float) -> dict[TaskKey, TaskMemory]:
    return summarise_memory(read_finished_runs(session, days=days))


class TaskMemoryHistory:
    """Each task's measured memory (``TaskMemory``) over the last ``days``, read with one query per ``ttl``.

    ``history(dag_id, task_id)`` answers from memory; None for a task with no measured run or none that ran
    out of memory, and for every task while the database cannot be read (logged once per outage). ``evidence``
    adds the out-of-memory deaths noted since (``note_out_of_memory``).
    """

    def __init__(
        self,
        session_factory: SessionFactory,
        days: float,
        ttl: float,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if days <= 0:
            raise ValueError(f"days must be > 0, got {days}")
        self.days = days
        self._cached = CachedRead(
            session_factory,
            partial(read_task_memory, days=days),
            ttl=ttl,
            timer=timer,
            what="Measured memory history",
            otherwise="no measured memory",
        )
        # The largest death per task only: it is all the policy learns from. Bounded, oldest noted forgotten
        # first; a forgotten one is in the database by then.
        self._noted: OrderedDict[TaskKey, OutOfMemoryRun] = OrderedDict()
        self._noted_lock = threading.Lock()

    @property
    def last_error(self) -> str | None:
        return self._cached.last_error

    def tasks(self) -> Mapping[TaskKey, TaskMemory]:
        """Every task's evidence, read from the database at most once per ``ttl``."""
        return self._cached.get()

    def __call__(self, dag_id: str, task_id: str) -> TaskMemory | None:
        return self.tasks().get((dag_id, task_id))

    def note_out_of_memory(self, dag_id: str, task_id: str, death: OutOfMemoryRun) -> None:
        """A death this router saw: ``evidence`` counts it at once, without waiting for the next read."""
        if death.memory_size_mb is None:
            return  # proves nothing about the need (memory_evidence ignores it too)
        key = (dag_id, task_id)
        with self._noted_lock:
            known = self._noted.get(key)
            if known is None or (known.memory_size_mb or 0) <= death.memory_size_mb:
                self._noted[key] = death
            self._noted.move_to_end(key)
            while len(self._noted) > MAX_NOTED_DEATHS:
                self._noted.popitem(last=False)

    def evidence(self, dag_id: str, task_id: str) -> MemoryEvidence | None:
        """The policy's view of a task's measured memory (a ``MemoryLookup``): its peaks, and the largest
        function it ran out of memory on (the one that proves the most about its need)."""
        task = self(dag_id, task_id)
        with self._noted_lock:
            noted = self._noted.get((dag_id, task_id))
        if noted is not None and noted.at >= datetime.now(timezone.utc) - timedelta(days=self.days):
            # Once the database's answer has it too, it is there twice: harmless, only the largest counts.
            task = _with_death(task, dag_id, task_id, noted)
        return memory_evidence(task)


def _with_death(task: TaskMemory | None, dag_id: str, task_id: str, death: OutOfMemoryRun) -> TaskMemory:
    if task is None:
        return TaskMemory(dag_id, task_id, (), None, (death,))
    return replace(task, out_of_memory=(*task.out_of_memory, death))


def memory_lookup(recorder: RunRecorder, *, days: float, ttl: float) -> MemoryLookup:
    """The router's ``MemoryLookup``: what the metadata database's rows say, and the deaths ``recorder`` sees
    before the next read has them."""
    from airflow.utils.session import create_session

    # Its own sessions, never the scheduler's scoped one: the lookup runs inside the scheduler's queueing
    # transaction, and closing the scoped session there would detach the scheduler's objects.
    history = TaskMemoryHistory(partial(create_session, scoped=False), days=days, ttl=ttl)
    recorder.memory_history = history
    return history.evidence


def memory_evidence(task: TaskMemory | None) -> MemoryEvidence | None:
    """A task's measured memory as the policy engine takes it; None when nothing was measured."""
    if task is None:
        return None
    death = task.largest_out_of_memory
    out_of_memory = (
        OutOfMemory(death.memory_size_mb, death.executor, death.at)
        if death is not None and death.memory_size_mb
        else None
    )
    if not task.peaks_mb and out_of_memory is None:
        return None
    return MemoryEvidence(len(task.peaks_mb), task.p95_peak_mb, out_of_memory)

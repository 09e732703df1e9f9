"""How long tasks really run: the p95 of each task's recent successful runs, from Airflow's metadata database.

The router asks for a task's expected duration on every routing decision, so the history of all tasks is read
with one query and kept for ``ttl`` seconds: one decision per ``ttl`` waits for that query, the others read
memory.

What counts is worker time, not wall time. A task resumed after deferral keeps the ``start_date`` of its
first run, so ``end_date - start_date`` (and Airflow's ``duration`` column) includes the time it waited in
the triggerer. The resumed run is queued again, though, which moves ``queued_dttm`` past ``start_date``: for
such a run the estimate is ``end_date - queued_dttm``, the last worker segment plus its (short) queue wait.
The worker time before each deferral is not recorded anywhere cheap and is left out; it is usually the short
part that submits the work and defers. Sensors in reschedule mode record each poke as its own run, which is
what an executor sees. Runs with no hostname never ran on a worker (marked successful by hand) and are
ignored.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from cachetools import TTLCache

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

TaskKey = tuple[str, str]  # (dag_id, task_id)
SessionFactory = Callable[[], AbstractContextManager["Session"]]

_CACHE_KEY = "all tasks"
V = TypeVar("V")


@dataclass(frozen=True)
class TaskRunStats:
    """The successful runs of one task in the look-back window."""

    dag_id: str
    task_id: str
    runs: int
    worker_seconds: float  # summed over all runs
    p95_seconds: float
    # of the most recent run: what the scheduler would hand the router for the next one
    queue: str | None
    pool: str | None
    operator: str | None


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); ``sorted_values`` must not be empty."""
    position = (len(sorted_values) - 1) * fraction
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def worker_seconds(start: datetime | None, end: datetime | None, queued: datetime | None) -> float | None:
    """Seconds a run occupied a worker, or None when the row does not say (see the module docstring)."""
    if start is None or end is None:
        return None
    began = queued if queued is not None and start < queued <= end else start
    seconds = (end - began).total_seconds()
    return seconds if seconds >= 0 else None


def _successful_runs_query(since: datetime) -> Any:
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import func, select, union_all

    def runs_of(table: Any) -> Any:
        return select(
            table.dag_id,
            table.task_id,
            table.start_date,
            table.end_date,
            table.queued_dttm,
            table.queue,
            table.pool,
            table.operator,
        ).where(
            table.state == TaskInstanceState.SUCCESS,
            table.end_date >= since,
            func.coalesce(table.hostname, "") != "",
        )

    # Earlier tries of a cleared task live in task_instance_history; the two tables never hold the same try.
    return union_all(runs_of(TaskInstance), runs_of(TaskInstanceHistory))


def summarise_runs(rows: Iterable[Any]) -> dict[TaskKey, TaskRunStats]:
    """Group run rows (dag_id, task_id, start_date, end_date, queued_dttm, queue, pool, operator) per task."""
    durations: dict[TaskKey, list[float]] = defaultdict(list)
    latest: dict[TaskKey, tuple[datetime, Any]] = {}
    for row in rows:
        dag_id, task_id, start, end, queued = row[:5]
        seconds = worker_seconds(start, end, queued)
        if seconds is None:
            continue
        key = (dag_id, task_id)
        durations[key].append(seconds)
        if key not in latest or end > latest[key][0]:
            latest[key] = (end, row)
    summary = {}
    for key, values in durations.items():
        values.sort()
        queue, pool, operator = latest[key][1][5:8]
        summary[key] = TaskRunStats(
            dag_id=key[0],
            task_id=key[1],
            runs=len(values),
            worker_seconds=math.fsum(values),
            p95_seconds=percentile(values, 0.95),
            queue=queue,
            pool=pool,
            operator=operator,
        )
    return summary


def trusted_p95(
    stats: Mapping[TaskKey, TaskRunStats], dag_id: str, task_id: str, min_runs: int
) -> float | None:
    """The task's p95 worker seconds when it has at least ``min_runs`` runs in ``stats``, else None."""
    task = stats.get((dag_id, task_id))
    return task.p95_seconds if task is not None and task.runs >= min_runs else None


def read_task_run_stats(
    session: Session, *, days: float, now: datetime | None = None
) -> dict[TaskKey, TaskRunStats]:
    """Read the successful runs of the last ``days`` days of every task with one query."""
    since = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    return summarise_runs(session.execute(_successful_runs_query(since)))


class CachedRead(Generic[V]):
    """What one read of the metadata database answered, kept for ``ttl`` seconds: one caller per ``ttl`` waits
    for the read, the others read memory.

    ``session_factory`` returns a context manager yielding a SQLAlchemy session (Airflow's
    ``airflow.utils.session.create_session``, or a ``sessionmaker``). Reading fails softly: a warning is logged
    once per outage, the answer is empty (``{}``) and the read is retried when the kept answer expires.
    """

    def __init__(
        self,
        session_factory: SessionFactory,
        read: Callable[[Session], Mapping[TaskKey, V]],
        *,
        ttl: float,
        timer: Callable[[], float],
        what: str,
        otherwise: str,
    ) -> None:
        if ttl < 0:
            raise ValueError(f"ttl must be >= 0, got {ttl}")
        self._session_factory = session_factory
        self._read_from = read
        self._what = what  # "Task duration history", for the log lines
        self._otherwise = otherwise  # what routing uses while the read fails
        self._cache: TTLCache[str, Mapping[TaskKey, V]] = TTLCache(maxsize=1, ttl=ttl, timer=timer)
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def get(self) -> Mapping[TaskKey, V]:
        with self._lock:
            cached = self._cache.get(_CACHE_KEY)
            if cached is None:
                cached = self._cache[_CACHE_KEY] = self._read()
            return cached

    def _read(self) -> Mapping[TaskKey, V]:
        try:
            with self._session_factory() as session:
                answer = self._read_from(session)
        except Exception as error:
            # Whatever breaks the read (database down, schema not migrated, Airflow not configured), routing
            # goes on without it.
            if self.last_error is None:
                log.warning("%s unavailable, using %s: %s", self._what, self._otherwise, error)
            self.last_error = f"{type(error).__name__}: {error}".splitlines()[0]
            return {}
        if self.last_error is not None:
            log.info("%s readable again", self._what)
            self.last_error = None
        log.debug("Read the %s of %d tasks", self._what.lower(), len(answer))
        return answer


class TaskDurationHistory:
    """The p95 worker time of each task's recent successful runs, for the policy's ``history`` lookup.

    Read with ``CachedRead``: while the database cannot be read the lookup answers None (the policy default
    applies).
    """

    def __init__(
        self,
        session_factory: SessionFactory,
        days: float,
        min_runs: int,
        ttl: float,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if days <= 0:
            raise ValueError(f"days must be > 0, got {days}")
        if min_runs < 1:
            raise ValueError(f"min_runs must be >= 1, got {min_runs}")
        self.days = days
        self.min_runs = min_runs
        self._cached = CachedRead(
            session_factory,
            partial(read_task_run_stats, days=days),
            ttl=ttl,
            timer=timer,
            what="Task duration history",
            otherwise="the policy's default durations",
        )

    @property
    def last_error(self) -> str | None:
        """Why the last read failed, while the database cannot be read."""
        return self._cached.last_error

    def stats(self) -> Mapping[TaskKey, TaskRunStats]:
        """Every task's run statistics, read from the database at most once per ``ttl``."""
        return self._cached.get()

    def p95(self, dag_id: str, task_id: str) -> float | None:
        """The task's p95 worker seconds, or None with fewer than ``min_runs`` runs or no database."""
        return trusted_p95(self.stats(), dag_id, task_id, self.min_runs)

    __call__ = p95  # the policy engine takes any ``(dag_id, task_id) -> seconds | None`` callable

"""The reads behind the Routing page: the router's audit rows in Airflow's ``log`` table, newest first.

Every read is scoped to the DAGs the user may read (``dags``) and pages by ``log.id`` so that each query is one
index range scan however many rows the table holds: ``idx_log_event`` and the primary key for the lists,
``idx_log_dttm`` for the charts' time window, ``idx_log_task_instance`` for one task instance's story. JSON fields
of ``extra`` are read by the database (``json_field``), never by parsing every row here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Integer, and_, case, cast, func, or_, select, type_coerce

from hybrid_router.router import audit
from hybrid_router.router.history import percentile
from hybrid_router.router.measured_runs import OUT_OF_MEMORY, read_finished_runs, summarise_memory
from hybrid_router.router.policy import MemoryEvidence, learned_memory_need

if TYPE_CHECKING:
    from sqlalchemy.orm import Session
    from sqlalchemy.sql import ColumnElement, Select

DECISION_EVENTS = (audit.EVENT_ROUTED, audit.EVENT_NEXT_TRY_ROUTED, audit.EVENT_ROUTE_ERROR)
FALLBACK_EVENTS = (audit.EVENT_FALLBACK, audit.EVENT_FALLBACK_EXHAUSTED, audit.EVENT_NEXT_TRY_ROUTED)
STORY_EVENTS = (
    *DECISION_EVENTS,
    audit.EVENT_FALLBACK,
    audit.EVENT_FALLBACK_EXHAUSTED,
    audit.EVENT_RUN_FINISHED,
)
MAX_PAGE = 500
MAX_LEARNED_TASKS = 500
# Chart buckets: about 24-48 bars whatever the window.
BUCKETS_S = (300, 900, 3600, 3 * 3600, 6 * 3600, 24 * 3600)


@dataclass(frozen=True)
class Filter:
    """What the page asks for: the DAGs the user may read, narrowed by the search boxes."""

    dags: Collection[str]  # readable DAG ids: nothing outside them is ever returned
    dag_id: str = ""
    task_id: str = ""
    run_id: str = ""
    exact: bool = False  # ids as given; otherwise dag_id and task_id match as case-insensitive substrings

    def clauses(self, log: Any) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = [log.owner == audit.AUDIT_OWNER, log.dag_id.in_(list(self.dags))]
        for column, value in ((log.dag_id, self.dag_id), (log.task_id, self.task_id)):
            if not value:
                continue
            if self.exact:
                found.append(column == value)
            else:
                found.append(func.lower(column).contains(value.lower(), autoescape=True))
        if self.run_id:
            found.append(log.run_id == self.run_id)
        return found


def json_field(session: Session, column: Any, key: str) -> ColumnElement[Any]:
    """``column``'s JSON text's field ``key`` as text, read by the database itself.

    A text that is not a JSON object (not the router's row) reads as NULL instead of failing the whole query:
    SQLite checks with ``json_valid``; PostgreSQL (15 has no ``IS JSON``) reads only texts shaped like an object.
    """
    if session.get_bind().dialect.name == "sqlite":
        return case((func.json_valid(column) == 1, type_coerce(column, JSON)[key].as_string()), else_=None)
    return case((column.like("{%}"), cast(column, JSON)[key].as_string()), else_=None)


def _epoch_bucket(session: Session, column: Any, bucket_s: int) -> ColumnElement[int]:
    if session.get_bind().dialect.name == "sqlite":
        seconds = cast(func.strftime("%s", column), Integer)
        return cast(seconds / bucket_s, Integer)
    return cast(func.floor(func.extract("epoch", column) / bucket_s), Integer)


def _row_base(log: Any) -> dict[str, Any]:
    return {
        "id": log.id,
        "when": _iso(log.dttm),
        "event": log.event,
        "dag_id": log.dag_id,
        "task_id": log.task_id,
        "run_id": log.run_id,
        "map_index": log.map_index,
        "try_number": log.try_number,
    }


def _extra(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat()


def _page(
    session: Session, query: Select[Any], limit: int, before_id: int | None
) -> tuple[list[Any], int | None]:
    from airflow.models import Log

    limit = max(1, min(limit, MAX_PAGE))
    if before_id is not None:
        query = query.where(Log.id < before_id)
    rows = list(session.scalars(query.order_by(Log.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


# -- the lists ------------------------------------------------------------------------------------------------


def decisions(
    session: Session, where: Filter, *, limit: int = 100, before_id: int | None = None
) -> dict[str, Any]:
    """Routing decisions, newest first: rule, executor, how (policy, overflow, next try), reasons and figures."""
    from airflow.models import Log

    query = select(Log).where(Log.event.in_(DECISION_EVENTS), *where.clauses(Log))
    rows, next_before = _page(session, query, limit, before_id)
    return {"decisions": [decision_row(row) for row in rows], "next_before_id": next_before}


def decision_row(log: Any) -> dict[str, Any]:
    extra = _extra(log.extra)
    row = _row_base(log)
    if log.event == audit.EVENT_ROUTE_ERROR:
        return {
            **row,
            "executor": None,
            "rule": None,
            "how": "error",
            "overflow_from": None,
            "reasons": [extra.get("error", "")],
            "figures": {},
        }
    if log.event == audit.EVENT_NEXT_TRY_ROUTED:
        return {
            **row,
            "executor": extra.get("next_executor"),
            "rule": None,
            "how": "next_try",
            "overflow_from": None,
            "reasons": [f"the previous run on {extra.get('failed_on')} died ({extra.get('reason')})"],
            "figures": {},
        }
    return {
        **row,
        "executor": extra.get("executor"),
        "rule": extra.get("rule"),
        "how": extra.get("how"),
        "overflow_from": extra.get("overflow_from"),
        "reasons": list(extra.get("reasons") or []),
        "figures": _figures(extra),
    }


def _figures(extra: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "duration_s": extra.get("expected_duration_s"),
        "duration_source": extra.get("duration_source"),
        "memory_mb": extra.get("memory_mb"),
        "memory_source": extra.get("memory_source"),
        "memory_basis": extra.get("memory_basis"),
    }


def fallbacks(
    session: Session, where: Filter, *, limit: int = 100, before_id: int | None = None
) -> dict[str, Any]:
    """Fallbacks (same try elsewhere, next try elsewhere, none left) and overflows, newest first."""
    from airflow.models import Log

    overflow = and_(Log.event == audit.EVENT_ROUTED, json_field(session, Log.extra, "how") == "overflow")
    query = select(Log).where(or_(Log.event.in_(FALLBACK_EVENTS), overflow), *where.clauses(Log))
    rows, next_before = _page(session, query, limit, before_id)
    return {"fallbacks": [fallback_row(row) for row in rows], "next_before_id": next_before}


def fallback_row(log: Any) -> dict[str, Any]:
    extra = _extra(log.extra)
    row = _row_base(log)
    if log.event == audit.EVENT_ROUTED:
        return {
            **row,
            "kind": "overflow",
            "from": extra.get("overflow_from"),
            "to": extra.get("executor"),
            "reason": "no free slot",
            "detail": None,
        }
    if log.event == audit.EVENT_FALLBACK_EXHAUSTED:
        return {
            **row,
            "kind": "exhausted",
            "from": extra.get("failed_on"),
            "to": None,
            "reason": extra.get("reason"),
            "detail": extra.get("why"),
        }
    if log.event == audit.EVENT_NEXT_TRY_ROUTED:
        return {
            **row,
            "kind": "next_try",
            "from": extra.get("failed_on"),
            "to": extra.get("next_executor"),
            "reason": extra.get("reason"),
            "detail": None,
        }
    return {
        **row,
        "kind": "fallback",
        "from": extra.get("failed_on"),
        "to": extra.get("executor"),
        "reason": extra.get("reason"),
        "detail": extra.get("detail"),
    }


def task_story(
    session: Session, where: Filter, *, dag_id: str, task_id: str, run_id: str, map_index: int = -1
) -> dict[str, Any]:
    """Everything the router wrote about one task instance, every try, oldest first."""
    from airflow.models import Log

    if dag_id not in where.dags:
        return {"events": []}
    query = (
        select(Log)
        .where(
            Log.dag_id == dag_id,
            Log.task_id == task_id,
            Log.run_id == run_id,
            Log.map_index == map_index,
            Log.owner == audit.AUDIT_OWNER,
            Log.event.in_(STORY_EVENTS),
        )
        .order_by(Log.id)
        .limit(MAX_PAGE)
    )
    return {"events": [story_row(row) for row in session.scalars(query)]}


def story_row(log: Any) -> dict[str, Any]:
    if log.event in DECISION_EVENTS and log.event != audit.EVENT_NEXT_TRY_ROUTED:
        return {**decision_row(log), "kind": "decision"}
    if log.event == audit.EVENT_RUN_FINISHED:
        return {**_row_base(log), "kind": "run_finished", **_extra(log.extra)}
    return fallback_row(log)


# -- the charts -----------------------------------------------------------------------------------------------


def bucket_for(hours: float) -> int:
    """The chart's bucket: the smallest that keeps the window to 48 bars at most."""
    window_s = hours * 3600
    return next((size for size in BUCKETS_S if window_s / size <= 48), BUCKETS_S[-1])


def charts(
    session: Session, where: Filter, *, hours: float = 24, now: datetime | None = None
) -> dict[str, Any]:
    """Rule hits per time bucket and fallbacks by reason, over the last ``hours``."""
    from airflow.models import Log

    now = now or datetime.now(timezone.utc)
    since = now - timedelta(hours=hours)
    bucket_s = bucket_for(hours)
    bucket = _epoch_bucket(session, Log.dttm, bucket_s).label("bucket")
    rule = json_field(session, Log.extra, "rule").label("rule")
    hits = session.execute(
        select(bucket, rule, func.count())
        .where(Log.dttm >= since, Log.event == audit.EVENT_ROUTED, *where.clauses(Log))
        .group_by(bucket, rule)
        .order_by(bucket)
    )
    reason = json_field(session, Log.extra, "reason").label("reason")
    reasons = session.execute(
        select(reason, func.count())
        .where(Log.dttm >= since, Log.event.in_(FALLBACK_EVENTS), *where.clauses(Log))
        .group_by(reason)
    )
    return {
        "since": _iso(since),
        "now": _iso(now),
        "bucket_s": bucket_s,
        "rule_hits": [
            {
                "bucket": _iso(datetime.fromtimestamp(int(start) * bucket_s, timezone.utc)),
                "rule": name or "(none)",
                "count": count,
            }
            for start, name, count in hits
            if start is not None
        ],
        "fallback_reasons": sorted(
            ({"reason": name or "(unknown)", "count": count} for name, count in reasons),
            key=lambda item: (-item["count"], item["reason"]),
        ),
    }


# -- what the router learned ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LearningSettings:
    """The policy's learning settings (``settings.memory_headroom``, ``settings.learn_after_runs``)."""

    days: float = 14
    memory_headroom: float = 1.2
    learn_after_runs: int = 5


def learned(session: Session, where: Filter, settings: LearningSettings) -> dict[str, Any]:
    """Each task's measured needs over the look-back window, as the router's next decision would use them."""
    from airflow.models import Log

    runs = [
        run
        for run in read_finished_runs(session, days=settings.days, where=where.clauses(Log))
        if run.dag_id in where.dags
    ]
    memory = summarise_memory(runs)
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for run in runs:
        counts[(run.dag_id, run.task_id)] += 1
        if run.duration_ms is not None and run.outcome != OUT_OF_MEMORY:
            durations[(run.dag_id, run.task_id)].append(run.duration_ms / 1000)
    keys = sorted(counts)
    tasks = [
        _learned_task(key, counts[key], memory.get(key), sorted(durations[key]), settings)
        for key in keys[:MAX_LEARNED_TASKS]
    ]
    # More tasks than a page shows: say so, and how many, so that a search narrows it instead of hiding them.
    return {
        "tasks": tasks,
        "days": settings.days,
        "total_tasks": len(keys),
        "truncated": len(keys) > len(tasks),
    }


def _learned_task(
    key: tuple[str, str], runs: int, task: Any, durations: list[float], settings: LearningSettings
) -> dict[str, Any]:
    from hybrid_router.router.measured_runs import memory_evidence

    evidence: MemoryEvidence | None = memory_evidence(task)
    need = (
        None
        if evidence is None
        else learned_memory_need(
            evidence, headroom=settings.memory_headroom, min_runs=settings.learn_after_runs
        )
    )
    death = task.largest_out_of_memory if task is not None else None
    return {
        "dag_id": key[0],
        "task_id": key[1],
        "runs": runs,
        "memory_mb_p95": None if task is None or task.p95_peak_mb is None else round(task.p95_peak_mb),
        "memory_need_mb": need.mb if need else None,
        "memory_source": need.basis if need else "policy default (not enough measured runs)",
        "duration_s_p95": round(percentile(durations, 0.95), 3) if durations else None,
        "out_of_memory": None
        if death is None
        else {"executor": death.executor, "memory_size_mb": death.memory_size_mb, "at": _iso(death.at)},
    }

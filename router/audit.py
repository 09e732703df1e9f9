"""What the router tells people: rows in Airflow's ``log`` table and lines in the task's own log file.

The wording of each routing event (routed, overflow, waiting, fallback, exhausted, next try, route error) is
built here, as a ``Notice``; the executor only decides which event happened.

Audit rows are written by the router itself. In Airflow 3.3.2 the scheduler saves every executor's
``_task_event_logs`` by handing a generator to ``bulk_save_objects(preserve_order=False)``, which inserts empty
rows and loses them all ("NOT NULL constraint failed: log.event"). So the router drains its children's task
event logs too and saves them with its own rows, in one short transaction per heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_router.router.fallback import ExhaustedCause

if TYPE_CHECKING:
    from airflow.models import Log
    from airflow.models.taskinstancekey import TaskInstanceKey

    from hybrid_router.child_protocol import InfrastructureFailure
    from hybrid_router.router.fallback import FallbacksExhausted, NextTryRoute
    from hybrid_router.router.policy import Decision

log = logging.getLogger(__name__)

AUDIT_OWNER = "hybrid_router"
# The ``log.event`` column is VARCHAR(60).
EVENT_ROUTED = "hybrid_router.routed"
EVENT_FALLBACK = "hybrid_router.fallback"
EVENT_FALLBACK_EXHAUSTED = "hybrid_router.fallback_exhausted"
EVENT_NEXT_TRY_ROUTED = "hybrid_router.next_try_fallback"
EVENT_ROUTE_ERROR = "hybrid_router.route_error"
# One per finished run, what it used (``measured_runs.py``): written even when routing rows are turned off.
EVENT_RUN_FINISHED = "hybrid_router.run_finished"
# Rows kept for another attempt when the database refused a flush; beyond this the oldest are dropped
# (and counted in the log line) rather than growing the scheduler's memory without bound.
MAX_PENDING_ROWS = 10_000


class AuditLog:
    """Buffers audit rows during a heartbeat and writes them in one transaction at its end."""

    def __init__(self, max_pending: int = MAX_PENDING_ROWS) -> None:
        self._pending: deque[Log] = deque(maxlen=max_pending)

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, event: str, key: TaskInstanceKey, **extra: Any) -> None:
        from airflow.models import Log

        self._pending.append(
            Log(
                event=event,
                task_instance=key,
                owner=AUDIT_OWNER,
                extra=json.dumps(extra, sort_keys=True, default=str),
            )
        )

    def adopt(self, rows: Iterable[Log]) -> None:
        """Take over rows a child put in its own ``_task_event_logs``."""
        self._pending.extend(rows)

    def flush(self) -> int:
        """Write the buffered rows; on a database error keep them for the next heartbeat."""
        if not self._pending:
            return 0
        from airflow.utils.session import create_session

        rows = list(self._pending)
        try:
            # Not the scheduler's scoped session: this must never commit or close the scheduler's work.
            with create_session(scoped=False) as session:
                session.add_all(rows)
        except Exception:
            log.exception("Could not write %d routing audit rows; will retry next heartbeat", len(rows))
            return 0
        for _ in rows:
            self._pending.popleft()
        return len(rows)


def task_log_file(log_path: str | os.PathLike[str] | None) -> Path | None:
    """The absolute local file of a workload's ``log_path`` (relative to ``[logging] base_log_folder``)."""
    if not log_path:
        return None
    from airflow.configuration import conf

    return Path(conf.get("logging", "base_log_folder")) / log_path


def write_task_log_line(log_path: str | os.PathLike[str] | None, message: str, level: str = "info") -> bool:
    """Append one structured line to the task's log file, the one the UI shows for this try.

    The task's supervisor appends to the same file, so the line lands just before the run it announces. It is
    written in the JSON-lines form the supervisor uses, so the UI shows it with a timestamp like any other.
    A failure to write is logged and never stops the task from running.
    """
    path = task_log_file(log_path)
    if path is None:
        return False
    line = json.dumps(
        {
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "level": level,
            "event": message,
            "logger": "hybrid_router",
        }
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    except OSError:
        log.warning("Could not write the routing line to task log %s", path, exc_info=True)
        return False
    return True


# -- the wording of each routing event -----------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    """One routing event as people see it: a task-log line and, when ``event`` is set, an audit row."""

    message: str
    event: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    level: str = "info"


def routed(decision: Decision, target: str, *, first_choice: str) -> Notice:
    """A task handed to ``target`` by its rule, or to an overflow executor when ``first_choice`` was full."""
    overflow_from = first_choice if target != first_choice else None
    message = f"hybrid_router: routed to executor '{target}' by rule '{decision.rule}'"
    if overflow_from:
        message += f", overflow from '{overflow_from}' which had no free slot"
    if decision.reasons:
        message += "; " + "; ".join(decision.reasons)
    how = "overflow" if overflow_from else "policy"
    return Notice(message, EVENT_ROUTED, _routed_extra(decision, target, how, overflow_from))


def routed_next_try(decision: Decision, target: str, *, first_choice: str, failed_on: str | None) -> Notice:
    """A later try handed to the fallback executor its previous try's death chose (fallback mode next_try)."""
    overflow_from = first_choice if target != first_choice else None
    message = (
        f"hybrid_router: routed to executor '{target}' because the previous try died on "
        f"'{failed_on}' for infrastructure reasons (fallback mode next_try)"
    )
    return Notice(message, EVENT_ROUTED, _routed_extra(decision, target, "next_try", overflow_from))


def _routed_extra(decision: Decision, target: str, how: str, overflow_from: str | None) -> dict[str, Any]:
    # The decision as the policy made it, then what happened: the executor that took the task.
    return {**decision.to_dict(), "executor": target, "how": how, "overflow_from": overflow_from}


def fallback_dispatched(
    decision: Decision | None,
    target: str,
    failure: InfrastructureFailure,
    *,
    failed_on: str | None,
    waited_s: float,
) -> Notice:
    """The same try handed to ``target`` after its run on ``failed_on`` died; the task log goes on below."""
    detail = f": {failure.detail}" if failure.detail else ""
    message = (
        f"hybrid_router: FALLBACK - the run on executor '{failed_on}' died "
        f"({failure.reason}{detail}); the same try runs again on executor '{target}'. "
        "The lines below are from that new run."
    )
    extra = {
        "executor": target,
        "rule": decision.rule if decision else None,
        "rule_index": decision.rule_index if decision else None,
        "how": "fallback",
        "failed_on": failed_on,
        "reason": failure.reason,
        "detail": failure.detail,
        "waited_s": round(waited_s, 3),
    }
    return Notice(message, EVENT_FALLBACK, extra)


def waiting(candidates: Sequence[str]) -> Notice:
    """A task no candidate has room for: it waits in the router (task log only, no audit row)."""
    return Notice(
        f"hybrid_router: waiting for a free slot on {candidate_list(candidates)}; the task is not dropped"
    )


def candidate_list(candidates: Sequence[str]) -> str:
    return ", ".join(candidates) or "(none configured)"


def next_try_routed(route: NextTryRoute) -> Notice:
    """A try that died fails as usual; its next try, if any, goes to ``route.executor``."""
    message = (
        f"hybrid_router: the run on executor '{route.failed_on}' died ({route.reason}); this try fails "
        f"and the next try, if the task has retries left, runs on executor '{route.executor}'"
    )
    extra = {"failed_on": route.failed_on, "reason": route.reason, "next_executor": route.executor}
    return Notice(message, EVENT_NEXT_TRY_ROUTED, extra, level="warning")


_EXHAUSTED_WHY = {
    ExhaustedCause.NO_FALLBACK_LEFT: "no fallback executor left",
    ExhaustedCause.MAX_FALLBACKS_REACHED: "max_fallbacks ({max_fallbacks}) reached",
}


def fallback_exhausted(
    failed_on: str, failure: InfrastructureFailure, exhausted: FallbacksExhausted
) -> Notice:
    """A try that died with no fallback left: it fails, and Airflow's retries apply."""
    why = _EXHAUSTED_WHY[exhausted.cause].format(max_fallbacks=exhausted.max_fallbacks)
    message = (
        f"hybrid_router: the run on executor '{failed_on}' died ({failure.reason}: {failure.detail}); "
        f"{why}, so the try fails"
    )
    extra = {"failed_on": failed_on, "reason": failure.reason, "why": why}
    return Notice(message, EVENT_FALLBACK_EXHAUSTED, extra, level="error")


def route_error(err: Exception) -> Notice:
    """A task the router cannot route; the message is also the FAILED event's info the scheduler shows."""
    return Notice(
        f"hybrid_router: cannot route this task: {err}", EVENT_ROUTE_ERROR, {"error": str(err)}, level="error"
    )


def refused_by_child(target: str, err: Exception | str) -> RuntimeError:
    """The error a task fails with when its child refused the workload outright."""
    return RuntimeError(f"executor '{target}' refused the task: {err}")


def log_read_failed(executor: str, err: Exception | str) -> str:
    """The line the task log view shows when a child could not read its part of the log."""
    return f"hybrid_router: executor '{executor}' could not read its log: {err}"

"""What the router tells people: rows in Airflow's ``log`` table and lines in the task's own log file.

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
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.models import Log
    from airflow.models.taskinstancekey import TaskInstanceKey

log = logging.getLogger(__name__)

AUDIT_OWNER = "hybrid_router"
# The ``log.event`` column is VARCHAR(60).
EVENT_ROUTED = "hybrid_router.routed"
EVENT_FALLBACK = "hybrid_router.fallback"
EVENT_FALLBACK_EXHAUSTED = "hybrid_router.fallback_exhausted"
EVENT_NEXT_TRY_ROUTED = "hybrid_router.next_try_fallback"
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

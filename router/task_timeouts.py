"""Each task's ``execution_timeout``, read from its serialized DAG once per DAG version.

The policy may take a task's expected duration from its execution timeout. The scheduler's task instance
does not carry the task, and deserializing a DAG for every queued task would cost far more than routing it, so
the serialized JSON of a DAG version is read once (two columns, no ORM object) and only the timeouts are kept.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)


def timeouts_from_serialized(data: Mapping[str, Any]) -> dict[str, float]:
    """``task_id -> execution_timeout seconds`` of the tasks that have one, from a serialized DAG dict."""
    found: dict[str, float] = {}
    for item in data.get("dag", {}).get("tasks", ()):
        fields = item.get("__var", item) if isinstance(item, Mapping) else {}
        timeout = fields.get("execution_timeout")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and "task_id" in fields:
            found[fields["task_id"]] = float(timeout)
    return found


class ExecutionTimeouts:
    """``get(session, dag_version_id, task_id)``: the task's timeout in seconds, or None."""

    def __init__(self, max_versions: int = 256) -> None:
        self._by_version: LRUCache[Any, dict[str, float]] = LRUCache(maxsize=max_versions)

    def get(self, session: Session, dag_version_id: Any, task_id: str) -> float | None:
        timeouts = self._by_version.get(dag_version_id)
        if timeouts is None:
            timeouts = self._by_version[dag_version_id] = self._read(session, dag_version_id)
        return timeouts.get(task_id)

    @staticmethod
    def _read(session: Session, dag_version_id: Any) -> dict[str, float]:
        from airflow.models.serialized_dag import SerializedDagModel
        from sqlalchemy import select

        try:
            row = session.execute(
                select(SerializedDagModel._data, SerializedDagModel._data_compressed).where(
                    SerializedDagModel.dag_version_id == dag_version_id
                )
            ).first()
            if row is None:
                return {}
            data, compressed = row
            if data is None and compressed is not None:
                data = json.loads(zlib.decompress(compressed))
            return timeouts_from_serialized(data or {})
        except Exception:
            # Routing goes on without the timeout (history or the policy default decide the duration).
            log.warning("Could not read the serialized DAG of version %s", dag_version_id, exc_info=True)
            return {}

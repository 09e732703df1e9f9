"""Execution timeouts read from serialized DAGs, once per DAG version."""

from __future__ import annotations

import json
import uuid
import zlib
from datetime import datetime, timezone

import pytest
from airflow.models.serialized_dag import SerializedDagModel
from sqlalchemy import event

from hybrid_router.router.task_timeouts import ExecutionTimeouts, timeouts_from_serialized

SERIALIZED = {
    "dag": {
        "dag_id": "d",
        "tasks": [
            {"__var": {"task_id": "slow", "execution_timeout": 1200.0}, "__type": "operator"},
            {"__var": {"task_id": "free"}, "__type": "operator"},
            {"__var": {"task_id": "odd", "execution_timeout": "soon"}, "__type": "operator"},
        ],
    }
}


def test_only_numeric_timeouts_are_kept():
    assert timeouts_from_serialized(SERIALIZED) == {"slow": 1200.0}
    assert timeouts_from_serialized({}) == {}


@pytest.mark.parametrize("compressed", [False, True])
def test_a_dag_version_is_read_once(session, compressed):
    version = uuid.uuid4()
    table = SerializedDagModel.__table__
    session.execute(
        table.insert().values(
            id=uuid.uuid4(),
            dag_id="d",
            data=None if compressed else SERIALIZED,
            data_compressed=zlib.compress(json.dumps(SERIALIZED).encode()) if compressed else None,
            dag_hash="h",
            dag_version_id=version,
            created_at=datetime.now(timezone.utc),
            last_updated=datetime.now(timezone.utc),
        )
    )
    queries = []
    event.listen(session.get_bind(), "before_cursor_execute", lambda *a: queries.append(a[2]))
    timeouts = ExecutionTimeouts()
    assert timeouts.get(session, version, "slow") == 1200.0
    assert timeouts.get(session, version, "free") is None
    assert timeouts.get(session, uuid.uuid4(), "slow") is None  # an unknown version: no timeout
    assert len(queries) == 2

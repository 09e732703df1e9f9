"""Fixtures for the CLI, config and history tests: a migrated SQLite metadata database and task runs in it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from .cli_runner import airflow_env


@dataclass
class MetadataDb:
    home: Path
    url: str

    def env(self, **extra: str) -> dict[str, str]:
        return airflow_env(self.home, **extra)


@pytest.fixture(scope="session")
def metadata_db(tmp_path_factory: pytest.TempPathFactory) -> MetadataDb:
    """A real Airflow metadata database: ``airflow db migrate`` on a new SQLite file (about 3 s)."""
    home = tmp_path_factory.mktemp("airflow_home")
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=airflow_env(home),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return MetadataDb(home=home, url=f"sqlite:///{home / 'airflow.db'}")


class RunWriter:
    """Inserts task runs into ``task_instance`` / ``task_instance_history`` the way Airflow leaves them."""

    def __init__(self, engine: Any):
        from airflow.models.taskinstance import TaskInstance
        from airflow.models.taskinstancehistory import TaskInstanceHistory

        self.engine = engine
        self.ti = TaskInstance.__table__
        self.tih = TaskInstanceHistory.__table__
        self.now = datetime.now(timezone.utc)

    def add(
        self,
        dag_id: str,
        task_id: str,
        seconds: float,
        *,
        state: str = "success",
        ended_ago: timedelta = timedelta(hours=1),
        deferred_for: float = 0.0,
        hostname: str | None = "worker-1",
        archived: bool = False,
        queue: str = "default",
        pool: str = "default_pool",
        operator: str = "PythonOperator",
    ) -> dict[str, Any]:
        """One run of ``seconds`` worker time; ``deferred_for`` seconds in the triggerer before its last part.

        Returns the row written (its ``run_id``, ``start_date``, ...)."""
        end = self.now - ended_ago
        start = end - timedelta(seconds=seconds)
        if deferred_for:
            # Resumed after deferral: Airflow keeps the first start_date and sets queued_dttm again when the
            # task is queued to resume; the 1 s before the deferral is the part the history cannot see.
            queued = end - timedelta(seconds=seconds)
            start = queued - timedelta(seconds=deferred_for + 1)
        else:
            queued = start - timedelta(seconds=2)
        row = {
            "task_id": task_id,
            "dag_id": dag_id,
            "run_id": f"run_{uuid.uuid4().hex}",
            "map_index": -1,
            "try_number": 1,
            "start_date": start,
            "end_date": end,
            "duration": (end - start).total_seconds(),
            "state": state,
            "hostname": hostname,
            "pool": pool,
            "pool_slots": 1,
            "queue": queue,
            "operator": operator,
            "queued_dttm": queued,
        }
        with self.engine.begin() as connection:
            if archived:
                connection.execute(self.tih.insert().values(task_instance_id=uuid.uuid4(), **row))
            else:
                connection.execute(self.ti.insert().values(id=uuid.uuid4(), **row))
        return row

    def clear(self) -> None:
        with self.engine.begin() as connection:
            connection.execute(self.tih.delete())
            connection.execute(self.ti.delete())


@pytest.fixture
def runs(metadata_db: MetadataDb) -> Iterator[RunWriter]:
    from sqlalchemy import create_engine

    engine = create_engine(metadata_db.url)
    writer = RunWriter(engine)
    writer.clear()
    try:
        yield writer
    finally:
        writer.clear()
        engine.dispose()


class AuditWriter:
    """Inserts the router's own rows into Airflow's ``log`` table, as ``audit.AuditLog`` leaves them."""

    def __init__(self, engine: Any):
        from airflow.models import Log

        self.engine = engine
        self.log = Log.__table__

    def add(self, event: str, run: dict[str, Any], at: datetime, **extra: Any) -> None:
        """A row of ``event`` for the try of ``run`` (a row ``RunWriter.add`` returned), written at ``at``."""
        import json

        from hybrid_router.router.audit import AUDIT_OWNER

        with self.engine.begin() as connection:
            connection.execute(
                self.log.insert().values(
                    dttm=at,
                    event=event,
                    owner=AUDIT_OWNER,
                    dag_id=run["dag_id"],
                    task_id=run["task_id"],
                    run_id=run["run_id"],
                    map_index=run["map_index"],
                    try_number=run["try_number"],
                    extra=json.dumps(extra),
                )
            )

    def clear(self) -> None:
        from hybrid_router.router.audit import AUDIT_OWNER

        with self.engine.begin() as connection:
            connection.execute(self.log.delete().where(self.log.c.owner == AUDIT_OWNER))


@pytest.fixture
def audit_rows(metadata_db: MetadataDb) -> Iterator[AuditWriter]:
    from sqlalchemy import create_engine

    engine = create_engine(metadata_db.url)
    writer = AuditWriter(engine)
    writer.clear()
    try:
        yield writer
    finally:
        writer.clear()
        engine.dispose()

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
    ) -> None:
        """One run of ``seconds`` worker time; ``deferred_for`` seconds in the triggerer before its last part."""
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

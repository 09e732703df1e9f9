from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hybrid_router.router import metrics


@pytest.fixture
def task_log_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "task-logs"
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(folder))
    return folder


@pytest.fixture
def counters(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(metrics.stats, "incr", lambda name, *a, **k: seen.append(name))
    monkeypatch.setattr(metrics.stats, "gauge", lambda *a, **k: None)
    return seen


@pytest.fixture
def write_policy(tmp_path: Path):
    def write(text: str, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def session():
    """An in-memory database with Airflow's tables, for the router's own SQL."""
    from airflow.models import import_all_models
    from airflow.models.base import Base
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    import_all_models()
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        yield session
    engine.dispose()

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from hybrid_router.router import audit, metrics


@pytest.fixture
def task_log_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "task-logs"
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(folder))
    return folder


@pytest.fixture
def audit_rows(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Rows the router would write to the ``log`` table, captured instead of written (no database here)."""
    written: list[Any] = []

    def flush(self: audit.AuditLog) -> int:
        rows = list(self._pending)
        self._pending.clear()
        written.extend(rows)
        return len(rows)

    monkeypatch.setattr(audit.AuditLog, "flush", flush)
    return written


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

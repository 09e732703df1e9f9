"""Test-session set-up shared by every test folder.

Airflow reads AIRFLOW_HOME when it is first imported, so it is pointed at a fresh folder here, before any test
imports Airflow: tests never read or write a developer's own Airflow home or database.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest

_home = tempfile.mkdtemp(prefix="hybrid-router-tests-")
os.environ["AIRFLOW_HOME"] = _home
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home}/airflow.db"

# Property-based tests run the same examples on every run by default, so CI's verdict does not depend on luck;
# `pytest --hypothesis-profile=explore` searches new examples (and keeps failures in .hypothesis/).
from hypothesis import settings  # noqa: E402

settings.register_profile("default", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", max_examples=2000, deadline=None)
settings.load_profile("default")


@pytest.fixture
def audit_rows(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Rows the router would write to Airflow's ``log`` table, captured instead (for tests with no database)."""
    from hybrid_router.router import audit

    written: list[Any] = []

    def flush(self: audit.AuditLog) -> int:
        rows = list(self._pending)
        self._pending.clear()
        written.extend(rows)
        return len(rows)

    monkeypatch.setattr(audit.AuditLog, "flush", flush)
    return written

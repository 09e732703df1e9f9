"""Test-session set-up shared by every test folder.

Airflow reads AIRFLOW_HOME when it is first imported, so it is pointed at a fresh folder here, before any test
imports Airflow: tests never read or write a developer's own Airflow home or database.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
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

from moto_sqs import Moto  # noqa: E402

from devtools.postgres import PostgresServer, PostgresUnavailable  # noqa: E402


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """moto's server (SQS, ECS...), one for the session.

    Never reset here: tests that share it use fresh queue names; the ECS tests reset it for their fixed names.
    """
    with Moto(log_dir=tmp_path_factory.mktemp("moto-logs")) as server:
        yield server


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of the session's own on loopback (see devtools/postgres.py).

    A machine without PostgreSQL's server programs fails these tests with how to get them: never a silent skip.
    """
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL is needed for this test: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new empty database for one test (each test migrates its own Airflow schema)."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """An end-to-end test's metadata database, once per backend: a SQLite file in its home (None), then PostgreSQL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


LOG_TAIL_LINES = 80


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A failed test that ran Airflow shows the last lines of each component's log (scheduler, API server...).

    CI keeps only what pytest prints: without this, a timed-out wait says what did not happen, never why.
    """
    report = yield
    if report.failed:
        for log_file in sorted(
            {log for home in _stack_homes(item) for log in home.glob("**/process-logs/*.log")}
        ):
            lines = log_tail(log_file.read_text(errors="replace").splitlines(), LOG_TAIL_LINES)
            report.sections.append((f"{log_file} (last lines, no debug)", "\n".join(lines)))
    return report


def _stack_homes(item: pytest.Item) -> list[Path]:
    """Where the test's Airflow components write their logs: its ``tmp_path``, and the home of a stack fixture
    (``AirflowStack``, or a namespace holding one as ``airflow``)."""
    funcargs = getattr(item, "funcargs", {})
    homes = [funcargs["tmp_path"]] if isinstance(funcargs.get("tmp_path"), Path) else []
    for value in funcargs.values():
        for candidate in (value, getattr(value, "airflow", None)):
            home = getattr(candidate, "home", None)
            if isinstance(home, Path):
                homes.append(home)
    return homes


def log_tail(lines: list[str], count: int) -> list[str]:
    """The last ``count`` lines that are not debug, a run of lines that differ only in their timestamp as one."""
    kept: list[str] = []
    repeats = 0
    for line in lines:
        if "[debug" in line:
            continue
        if kept and line.partition(" ")[2] == kept[-1].partition(" ")[2]:
            repeats += 1
            continue
        if repeats:
            kept.append(f"    (and {repeats} more times, the line above)")
            repeats = 0
        kept.append(line)
    if repeats:
        kept.append(f"    (and {repeats} more times, the line above)")
    return kept[-count:]

"""Running ``python -m hybrid_router`` in a subprocess, with an Airflow home of its own, for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_TASKS = REPO_ROOT / "examples" / "tasks.csv"


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for a subprocess using ``home`` as AIRFLOW_HOME, free of the caller's AIRFLOW__ settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
    )
    env.update(extra)
    return env


def run_module(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """``python -m hybrid_router ARGS`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "hybrid_router", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )

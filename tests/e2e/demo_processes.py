"""Finding the processes a demo left behind (``make demo`` and ``make demo DEMO_ARGS=--serve``)."""

from __future__ import annotations

from pathlib import Path

import psutil


def processes_using(home: Path) -> list[str]:
    """Processes (of this user) whose AIRFLOW_HOME is the demo's, or that run from inside it."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            environ_home = proc.environ().get("AIRFLOW_HOME", "")
            cwd = proc.cwd()
        except (psutil.Error, OSError):
            continue
        if environ_home.startswith(str(home)) or cwd.startswith(str(home)):
            found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])}")
    return found

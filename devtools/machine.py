"""The machine a benchmark ran on, read at run time, so every printed figure names it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine() -> dict[str, object]:
    """Cores, CPU model, memory and Python of this machine, and the Airflow version measured."""
    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    try:
        from airflow import __version__ as airflow_version
    except ImportError:  # a benchmark of the local service alone
        airflow_version = None
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "airflow": airflow_version,
    }


def machine_line() -> str:
    """One human-readable line: ``machine: 2 cores, <model>, 24.0 GiB, Python 3.12.3, Airflow 3.3.2``."""
    m = describe_machine()
    return (
        f"machine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB, Python {m['python']}, "
        f"Airflow {m['airflow']}"
    )

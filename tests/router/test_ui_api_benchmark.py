"""The Routing page's speed benchmark as a (slow) test, run by hand: pytest -m slow tests/router/test_ui_api_benchmark.py -s

A small load (``benchmarks/ui_api.py --records 3000``) on SQLite and PostgreSQL: every data endpoint answers under
a real API server on both, and the last line carries the figures the full run reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ui_api.py"
ENDPOINTS = {"decisions", "fallbacks", "charts", "learned", "task", "live"}


@pytest.mark.slow
def test_every_endpoint_is_measured_on_both_databases() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--records", "3000", "--rounds", "2", "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["records"] == 3000
    for database in ("sqlite", "postgres"):
        assert set(figures[database]) == ENDPOINTS, figures[database]
        assert all(endpoint["requests"] > 0 for endpoint in figures[database].values())
    largest = max(
        endpoint["p95_ms"] for database in ("sqlite", "postgres") for endpoint in figures[database].values()
    )
    assert figures["p95_ms"] == largest > 0

"""The failover benchmark as a (slow) test, run by hand: pytest -m slow tests/router/test_ha_failover_benchmark.py -s

300 tasks across Lambda and Local on two schedulers, one killed with -9 in the middle (``benchmarks/ha_failover.py``):
nothing lost, nothing run twice, no retry spent besides the dead scheduler's LocalExecutor tries, the kill hit
work on Lambda and work waiting in its router, and Lambda never ran more at once than the function allows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ha_failover.py"
MUST_BE_ZERO = ("lost", "double_runs", "retries_spent", "resets_not_on_local")


@pytest.mark.slow
def test_a_scheduler_lost_mid_flight_loses_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tasks", "300"], capture_output=True, text=True, timeout=2 * 3600
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["tasks"] == 300 and figures["state"] == "success", figures
    assert {key: figures[key] for key in MUST_BE_ZERO} == dict.fromkeys(MUST_BE_ZERO, 0), figures
    assert figures["on_lambda_at_kill"] > 0 and figures["waiting_at_kill"] > 0, figures
    assert figures["adopted"] >= figures["adopted_tasks_seen"] > 0, figures
    assert figures["recovery_s"] is not None, figures
    assert figures["max_lambda_in_flight"] <= figures["lambda_concurrency_limit"], figures

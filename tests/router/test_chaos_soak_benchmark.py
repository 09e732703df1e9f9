"""The chaos soak as a (slow) test, run by hand: pytest -m slow tests/router/test_chaos_soak_benchmark.py -s

300 tasks through the router while every fault the soak injects is on (``benchmarks/chaos_soak.py``): nothing
lost, nothing run twice, no retry spent, every task successful, and every kind of fault really injected.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos_soak.py"
MUST_BE_ZERO = ("lost", "double_runs", "retries_spent", "wrong_states")
INJECTED = ("duplicates_delivered", "invoke_answers_lost", "sends_failed", "receive_outage_s")


@pytest.mark.slow
def test_chaos_soak_runs_each_try_once() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tasks", "300"], capture_output=True, text=True, timeout=4 * 3600
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["tasks"] == 300
    assert {key: figures[key] for key in MUST_BE_ZERO} == dict.fromkeys(MUST_BE_ZERO, 0), result.stdout[
        -3000:
    ]
    # Counted by the fault layer, not taken from the settings: a soak that injected nothing proves nothing.
    for fault in INJECTED:
        assert figures[fault] > 0, (fault, figures)

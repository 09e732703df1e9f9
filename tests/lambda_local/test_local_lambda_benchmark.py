"""The warm-start benchmark, run by hand: pytest -m slow tests/lambda_local -s"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "local_lambda_rate.py"


@pytest.mark.slow
def test_warm_noop_invocations_per_second() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--events", "300", "--sync-calls", "100"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    print(result.stdout)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # A warm sandbox answers over a pipe: far above one Python start-up per invocation (~3 per second).
    assert figures["noop_invocations_per_s"] > 50
    assert figures["sync_warm_latency_ms_p50"] < 50
    assert figures["async_cold_starts"] == figures["reserved_concurrency"]

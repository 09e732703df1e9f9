"""The router with a real Lambda child (local Lambda service, moto's SQS): a Lambda timeout falls back to Local.

The scenario is the fallback-latency benchmark's (``benchmarks/fallback_latency.py``), run small.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "fallback_latency.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("fallback_latency", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_lambda_timeout_runs_the_same_try_on_the_local_fallback(tmp_path):
    benchmark = load_benchmark()
    # Room for all four at once on Lambda, so none overflows to local before its Lambda run, and a timeout long
    # enough for four cold sandboxes to start Airflow's task runner on a loaded 2-core machine.
    with benchmark.run_scenario(tmp_path, slow=2, quick=2, function_timeout_s=15, concurrency=4) as scenario:
        assert scenario.state == "success", scenario.stack.log_dir
        tis = scenario.task_instances()
        assert {t: ti["state"] for t, ti in tis.items()} == dict.fromkeys(tis, "success")
        assert {ti["try_number"] for ti in tis.values()} == {1}  # no retry was spent
        ids = scenario.external_ids()
        assert ids["too_slow_0"] == ids["too_slow_1"] == "local@1"
        assert ids["quick_0"].startswith("lambda@1|lambda:airflow-task:")
        fallbacks = {
            task_id: extra for event, task_id, extra in scenario.audit() if event == "hybrid_router.fallback"
        }
        assert set(fallbacks) == {"too_slow_0", "too_slow_1"}
        assert {extra["reason"] for extra in fallbacks.values()} == {"timeout"}
        assert {extra["failed_on"] for extra in fallbacks.values()} == {"lambda"}
        log = scenario.stack.task_log(benchmark.DAG_ID, scenario.run_id, "too_slow_0")
        assert "FALLBACK - the run on executor 'lambda' died (timeout" in log
        assert "too_slow 0 finished on the fallback executor" in log
        latencies = scenario.latencies()
        assert set(latencies) == {"too_slow_0", "too_slow_1"}
        # Fenced: the Lambda run left no sign of life after the fallback run started.
        assert min(latencies.values()) > 0, latencies
        # Generous for a loaded 2-core machine; the benchmark reports the real figures.
        assert max(latencies.values()) < 10, latencies

"""The scale benchmark (``benchmarks/scale.py``: the router on the Lambda path against a bare LocalExecutor,
through a real scheduler): how it turns runs into ratios, and a small run of the whole benchmark as a (slow)
test, run by hand: pytest -m slow tests/router/test_scale_benchmark.py -s
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark as load_benchmark_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"
RATIOS = ("wall_ratio", "p99_ratio", "cpu_ratio", "rss_ratio")


def load_benchmark():
    return load_benchmark_script("scale")


def _run(
    module, variant: str, round_number: int, wall_s: float, waits: list[float], cpu_s: float, rss_mb: float
):
    cpu = module.StackCpu(
        scheduler=cpu_s,
        scheduler_children=0.0,
        sandboxes=0.0,
        lambda_service=0.0,
        moto=0.0,
        api_server=0.0,
        dag_processor=0.0,
        machine_busy=0.0,
        measured_s=wall_s,
    )
    return module.Run(variant, round_number, wall_s, waits, 0, rss_mb, 10, cpu, 1.0)


def test_the_order_alternates_and_each_ratio_is_the_routers_median_over_the_local_executors():
    module = load_benchmark()
    assert [module.round_order(n) for n in (1, 2, 3)] == [
        ("router", "local"),
        ("local", "router"),
        ("router", "local"),
    ]
    runs = [
        _run(module, "router", 1, 30.0, [1.0, 6.0], 12.0, 220.0),
        _run(module, "router", 2, 36.0, [1.0, 9.0], 99.0, 240.0),
        _run(module, "router", 3, 33.0, [1.0, 8.0], 11.0, 230.0),
        _run(module, "local", 1, 20.0, [1.0, 4.0], 10.0, 200.0),
        _run(module, "local", 2, 25.0, [1.0, 2.0], 10.0, 190.0),
        _run(module, "local", 3, 22.0, [1.0, 5.0], 10.0, 210.0),
    ]
    args = argparse.Namespace(
        tasks=2,
        rounds=3,
        core_parallelism=32,
        concurrency=8,
        local_workers=8,
        max_active_tasks=None,
        warmup_tasks=16,
        database="postgres",
    )
    figures = module.summary(runs, args, None)
    # Medians, so one disturbed run (the router's 99 CPU-s) moves nothing.
    assert (figures["wall_s_router"], figures["wall_s_local"]) == (33.0, 22.0)
    assert (figures["queued_to_running_p99_s_router"], figures["queued_to_running_p99_s_local"]) == (8.0, 4.0)
    assert figures["wall_ratio"] == pytest.approx(33 / 22, abs=1e-3)
    assert figures["p99_ratio"] == pytest.approx(2.0)
    assert figures["cpu_ratio"] == pytest.approx(1.2)
    assert figures["rss_ratio"] == pytest.approx(230 / 200, abs=1e-3)
    assert figures["meets_targets"] == {
        "wall_ratio": False,
        "p99_ratio": False,
        "cpu_ratio": False,
        "rss_ratio": True,
    }
    json.dumps(figures)  # the last line is one JSON object


@pytest.mark.slow
def test_scale_benchmark_prints_the_four_ratios() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tasks", "40", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["tasks"] == 40
    for ratio in RATIOS:
        assert figures[ratio] > 0, (ratio, figures)
    for variant in ("router", "local"):
        assert figures[f"wall_s_{variant}"] > 0, figures
        assert (
            0
            <= figures[f"queued_to_running_p50_s_{variant}"]
            <= figures[f"queued_to_running_p99_s_{variant}"]
        )
        assert figures[f"scheduler_cpu_s_{variant}"] > 0, figures
        assert figures[f"peak_rss_mb_{variant}"] > 0, figures
    # Every task took the Lambda path, and the Lambda side's processes were measured.
    assert figures["router_tasks_by_child"] == {"lambda": 40}, figures
    assert figures["sandboxes_cpu_s_router"] > 0 and figures["moto_cpu_s_router"] > 0, figures
    assert figures["latency_model"]["invoke_median_ms"] == 25, figures

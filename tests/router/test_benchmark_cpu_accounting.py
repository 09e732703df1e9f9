"""The benchmarks' CPU accounting of a process tree (``benchmarks/scheduler_runs.py``)."""

from __future__ import annotations

from benchmark_scripts import load_benchmark


def test_a_descendant_that_ends_during_the_window_counts_only_what_it_used_in_it():
    runs = load_benchmark("scheduler_runs")
    # Before: sandbox 11 had used 100 s (an earlier run), 12 had used 5 s. After: 11 ended (its parent reaped its
    # whole life, 103 s), 12 used 2 s more, 13 started and used 4 s.
    before = runs.CpuSnapshot({"lambda": 0.0}, {"lambda": 50.0}, {"lambda": {11: 100.0, 12: 5.0}}, 0.0)
    after = runs.CpuSnapshot({"lambda": 0.0}, {"lambda": 153.0}, {"lambda": {12: 7.0, 13: 4.0}}, 0.0)
    assert runs.descendants_cpu(before, after, "lambda") == 3.0 + 2.0 + 4.0

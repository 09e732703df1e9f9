from __future__ import annotations

import random

import pytest
from benchmark_scripts import load_benchmark

from hybrid_router.router.policy import load_policy_text


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("policy_decisions")


def test_benchmark_policy_loads_cleanly_and_uses_most_rules(benchmark):
    policy = load_policy_text(benchmark.build_policy_text(50), "bench.yaml")
    assert len(policy.rules) == 50
    facts = benchmark.distinct_facts(2000, 50, random.Random(1))
    decided_by = {policy.decide_uncached(task).rule_index for task in facts}
    assert len(decided_by) > 25  # the facts exercise early, late and no-match paths alike
    assert all(policy.decide(task) == policy.decide_uncached(task) for task in facts)


@pytest.mark.slow
def test_decision_latency_targets(benchmark):
    result = benchmark.run(decisions=30_000, distinct=3000, rule_count=50, seed=7)
    assert result["uncached_p99_us"] < 50
    assert result["cached_p99_us"] < 5

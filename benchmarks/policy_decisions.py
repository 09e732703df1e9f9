"""How fast the policy engine decides: uncached (every rule evaluated) against cached (steady state).

Builds a 50-rule policy with varied conditions (queues, pools, operators, dag_id/task_id globs, duration and
memory comparisons), loads it through the real loader, and times 100,000 decisions on facts drawn from a few
thousand distinct tasks, as a scheduler sees them: most tasks recur every run. Each call is timed alone with
time.perf_counter_ns; decisions/s is the number of calls over the sum of their times, so a machine busy with
other work shows in the mean and the throughput long before it shows in p50/p99. The last line printed is one
JSON object.

    python benchmarks/policy_decisions.py [--decisions 100000] [--distinct 3000] [--rules 50] [--seed 7]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from hybrid_router.router.policy import Decision, Policy, TaskFacts, load_policy_text

EXECUTORS = """\
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    limits: {max_duration: 15m, max_memory_mb: 10240}
  lambda_big:
    class: hybrid_router.lambda_exec.LambdaExecutor
    limits: {max_duration: 15m, max_memory: 10GB}
  ecs:
    class: airflow.providers.amazon.aws.executors.ecs.ecs_executor.AwsEcsExecutor
  local:
    class: LocalExecutor
defaults: {expected_duration: 5m, memory_mb: 512, run_on: local}
rules:
"""
TEAMS = ["etl", "report", "ml", "billing", "crm", "ads", "search", "infra", "growth", "risk"]
OPERATORS = [
    "airflow.providers.standard.operators.bash.BashOperator",
    "airflow.providers.standard.operators.python.PythonOperator",
    "airflow.providers.amazon.aws.operators.s3.S3CopyObjectOperator",
    "airflow.providers.common.sql.operators.sql.SQLExecuteQueryOperator",
    "airflow.providers.http.operators.http.HttpOperator",
]


def build_policy_text(rule_count: int) -> str:
    """``rule_count`` rules (the last a catch-all) cycling through the kinds of condition a policy uses."""
    kinds: list[Callable[[int], str]] = [
        lambda i: f'{{queue: "q{i}"}}',
        lambda i: f'{{dag_id: "{TEAMS[i % 10]}_{i}_*", expected_duration: "< 12m"}}',
        lambda i: (
            f'{{dag_id: ["{TEAMS[i % 10]}_x{i}*", "{TEAMS[(i + 3) % 10]}_y{i}?"], memory_mb: "<= 3GB"}}'
        ),
        lambda i: f'{{task_id: "load_{i}_*", pool: ["pool_{i}", "pool_{i + 1}"]}}',
        lambda i: f'{{operator: {OPERATORS[i % 5].rsplit(".", 1)[1]}, dag_id: "{TEAMS[i % 10]}_{i}*"}}',
        lambda i: f'{{expected_duration: [">= {i}m", "< {i + 2}m"], memory_mb: "> {i * 64}"}}',
        lambda i: f'{{queue: ["q{i}", "r{i}"], task_id: ["*_{i}", "step{i}_*"]}}',
    ]
    targets = ["lambda", "lambda_big", "ecs", "local"]
    rules = []
    for i in range(rule_count - 1):
        run_on = targets[i % len(targets)]
        others = [name for name in ("local", "ecs") if name != run_on]
        rules.append(
            f"  - name: rule {i}\n"
            f"    if: {kinds[i % len(kinds)](i)}\n"
            f"    run_on: {run_on}\n"
            f"    overflow: [{others[0]}]\n"
            f"    fallback: [{', '.join(others)}]\n"
        )
    rules.append("  - name: everything else\n    run_on: local\n")
    return EXECUTORS + "".join(rules)


def distinct_facts(count: int, rule_count: int, rng: random.Random) -> list[TaskFacts]:
    """Tasks of which some match early rules, many match late ones, and a good share no rule but the last."""
    facts = []
    for _ in range(count):
        i = rng.randrange(rule_count * 2)  # half the indexes are beyond every rule: worst case, all evaluated
        team = TEAMS[i % 10]
        facts.append(
            TaskFacts(
                dag_id=rng.choice(
                    [f"{team}_{i}_daily", f"{team}_x{i}_hourly", f"{team}_y{i}1", f"adhoc_{i}"]
                ),
                task_id=rng.choice([f"load_{i}_part", f"extract_{i}", f"step{i}_a", f"t{rng.randrange(50)}"]),
                queue=rng.choice([None, "default", f"q{i}", f"r{i}"]),
                pool=rng.choice([None, "default_pool", f"pool_{i}"]),
                operator=rng.choice(OPERATORS),
                expected_duration_s=rng.choice([None, rng.uniform(1, 3600)]),
                duration_source="history",
                memory_mb=rng.choice([None, rng.choice([256, 512, 1024, 3008, 4096, 12288])]),
                memory_source="executor_config",
            )
        )
    return facts


def time_calls(decide: Callable[[TaskFacts], Decision], stream: Sequence[TaskFacts]) -> list[int]:
    timings = [0] * len(stream)
    clock = time.perf_counter_ns
    for index, facts in enumerate(stream):
        start = clock()
        decide(facts)
        timings[index] = clock() - start
    return timings


def summary(timings: list[int]) -> dict[str, float]:
    ordered = sorted(timings)
    total_s = sum(ordered) / 1e9
    return {
        "decisions_per_s": len(ordered) / total_s,
        "p50_us": ordered[len(ordered) // 2] / 1000,
        "p99_us": ordered[int(len(ordered) * 0.99)] / 1000,
        "mean_us": statistics.fmean(ordered) / 1000,
    }


def run(decisions: int, distinct: int, rule_count: int, seed: int) -> dict[str, float | int]:
    rng = random.Random(seed)
    load_start = time.perf_counter()
    policy: Policy = load_policy_text(build_policy_text(rule_count), "benchmark-policy.yaml")
    load_ms = (time.perf_counter() - load_start) * 1000
    pool = distinct_facts(distinct, rule_count, rng)
    # a few tasks recur far more often than others, as in real deployments
    stream = rng.choices(pool, weights=[1 / (rank + 1) ** 0.5 for rank in range(len(pool))], k=decisions)
    rules_hit = {policy.decide_uncached(facts).rule_index for facts in pool}

    gc.collect()
    uncached = summary(time_calls(policy.decide_uncached, stream))
    gc.collect()
    cached_cold = summary(time_calls(policy.decide, stream))  # first sight of each task misses
    gc.collect()
    cached = summary(time_calls(policy.decide, stream))  # steady state: every task seen before
    info = policy.cache_info()

    rows = [
        ("uncached (decide_uncached)", uncached),
        ("cached, warm (decide)", cached),
        ("cached, cold", cached_cold),
    ]
    print(
        f"policy: {len(policy.rules)} rules, loaded in {load_ms:.1f} ms; {len(rules_hit)} distinct rules decide"
    )
    print(f"stream: {decisions} decisions over {len(set(stream))} distinct tasks")
    print(f"{'':28} {'decisions/s':>12} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    for label, row in rows:
        print(
            f"{label:28} {row['decisions_per_s']:>12,.0f} {row['p50_us']:>8.2f} {row['p99_us']:>8.2f}"
            f" {row['mean_us']:>8.2f}"
        )
    print(
        f"cached vs uncached: {cached['decisions_per_s'] / uncached['decisions_per_s']:.1f}x the throughput, "
        f"p99 {uncached['p99_us'] / cached['p99_us']:.1f}x lower"
    )
    return {
        "rules": len(policy.rules),
        "decisions": decisions,
        "distinct_facts": len(set(stream)),
        "uncached_decisions_per_s": round(uncached["decisions_per_s"]),
        "uncached_p50_us": round(uncached["p50_us"], 2),
        "uncached_p99_us": round(uncached["p99_us"], 2),
        "cached_decisions_per_s": round(cached["decisions_per_s"]),
        "cached_p50_us": round(cached["p50_us"], 2),
        "cached_p99_us": round(cached["p99_us"], 2),
        "cached_cold_p99_us": round(cached_cold["p99_us"], 2),
        "cache_hits": info.hits,
        "cache_misses": info.misses,
        "load_ms": round(load_ms, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--distinct", type=int, default=3000)
    parser.add_argument("--rules", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    result = run(args.decisions, args.distinct, args.rules, args.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

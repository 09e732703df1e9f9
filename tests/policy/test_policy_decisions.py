from __future__ import annotations

import json

import pytest

from hybrid_router.policies import DEFAULT_POLICY
from hybrid_router.router.policy import (
    Decision,
    Defaults,
    ExecutorSpec,
    Limits,
    Policy,
    Rule,
    TaskFacts,
    load_policy,
)

from .policy_texts import load, policy_text


@pytest.fixture(scope="module")
def default_policy():
    return load_policy(DEFAULT_POLICY)


def facts(**overrides) -> TaskFacts:
    return TaskFacts(**{"dag_id": "etl_daily", "task_id": "extract", **overrides})


def test_queue_pinned_task_goes_to_lambda(default_policy):
    decision = default_policy.decide(facts(queue="lambda"))
    assert (decision.executor, decision.rule, decision.rule_index) == (
        "lambda",
        "pinned to lambda by queue",
        0,
    )
    assert decision.overflow == ("local",)
    assert decision.fallback == ("local",)
    assert "queue 'lambda' matches rule 'pinned to lambda by queue'" in decision.reasons


def test_five_minute_task_goes_to_lambda(default_policy):
    decision = default_policy.decide(facts(expected_duration_s=300, duration_source="execution_timeout"))
    assert (decision.executor, decision.rule) == ("lambda", "short and small")
    assert (decision.expected_duration_s, decision.duration_source) == (300, "execution_timeout")
    assert (decision.memory_mb, decision.memory_source) == (512, "policy_default")
    assert (
        "expected duration 5m from execution_timeout < 12m, as rule 'short and small' requires"
        in decision.reasons
    )


def test_unknown_task_uses_the_policy_default_duration(default_policy):
    decision = default_policy.decide(facts())
    assert decision.executor == "lambda"
    assert (decision.expected_duration_s, decision.duration_source) == (300, "policy_default")


def test_forty_minute_task_goes_local_and_says_why_not_lambda(default_policy):
    decision = default_policy.explain(facts(expected_duration_s=2400, duration_source="history"))
    assert (decision.executor, decision.rule, decision.rule_index) == ("local", "everything else", 2)
    assert (decision.overflow, decision.fallback) == ((), ())
    assert "rule 'short and small' does not match: expected duration 40m from history is not < 12m" in (
        decision.reasons
    )


def test_forty_minute_task_pinned_to_lambda_skips_it_for_its_limits(default_policy):
    decision = default_policy.decide(
        facts(queue="lambda", expected_duration_s=2400, duration_source="history")
    )
    assert decision.executor == "local"
    assert "rule 'pinned to lambda by queue' skipped: expected 40m exceeds lambda's max_duration 15m" in (
        decision.reasons
    )


def test_twelve_gigabyte_task_goes_local(default_policy):
    decision = default_policy.decide(facts(queue="lambda", memory_mb=12288, memory_source="executor_config"))
    assert decision.executor == "local"
    assert (
        "rule 'pinned to lambda by queue' skipped: memory 12288 MB exceeds lambda's max_memory_mb 10240"
        in (decision.reasons)
    )


def test_rule_whose_executor_cannot_take_the_task_is_skipped_even_when_it_matches():
    policy = load(
        policy_text(
            """
            - name: short and small
              if: {dag_id: "etl_*"}
              run_on: lambda
              fallback: [local]
            - {name: everything else, run_on: local}
            """
        )
    )
    decision = policy.decide(facts(expected_duration_s=2400))
    assert decision.executor == "local"
    assert (
        decision.reasons[1]
        == "rule 'short and small' skipped: expected 40m exceeds lambda's max_duration 15m"
    )


GLOB_POLICY = policy_text(
    """
    - name: reports
      if: {dag_id: ["report_*", "kpi_?"], task_id: "render*"}
      run_on: lambda
    - name: bash
      if: {operator: BashOperator}
      run_on: lambda
    - name: exact python
      if: {operator: airflow.providers.standard.operators.python.PythonOperator}
      run_on: lambda
    - name: pooled
      if: {pool: [db, warehouse]}
      run_on: local
    - name: mid-sized
      if: {expected_duration: [">= 1m", "< 10m"], memory_mb: "> 1GB"}
      run_on: lambda
      overflow: local
    - {name: rest, run_on: local}
    """
)


@pytest.fixture(scope="module")
def glob_policy():
    return load(GLOB_POLICY)


@pytest.mark.parametrize(
    ("task", "rule"),
    [
        (facts(dag_id="report_sales", task_id="render_pdf"), "reports"),
        (facts(dag_id="kpi_7", task_id="render"), "reports"),
        (facts(dag_id="kpi_77", task_id="render"), "rest"),  # ? is one character
        (facts(dag_id="Report_sales", task_id="render"), "rest"),  # globs are case-sensitive
        (facts(dag_id="report_sales", task_id="upload"), "rest"),  # every condition must hold
        (facts(operator="BashOperator"), "bash"),
        (facts(operator="airflow.providers.standard.operators.bash.BashOperator"), "bash"),
        (facts(operator="my.company.BashOperatorV2"), "rest"),
        (facts(operator="airflow.providers.standard.operators.python.PythonOperator"), "exact python"),
        # Airflow records the bare class name: nothing tells it from another module's class of that name
        (facts(operator="PythonOperator"), "exact python"),
        (facts(operator="other.module.PythonOperator"), "rest"),
        (facts(operator="operators.python"), "rest"),
        (facts(pool="warehouse"), "pooled"),
        (facts(pool="default_pool"), "rest"),
        (facts(expected_duration_s=300, memory_mb=2048), "mid-sized"),
        (facts(expected_duration_s=600, memory_mb=2048), "rest"),  # "< 10m" is strict
        (facts(expected_duration_s=60, memory_mb=1025), "mid-sized"),
        (facts(expected_duration_s=300, memory_mb=1024), "rest"),  # "> 1GB" is strict
    ],
)
def test_conditions(glob_policy, task, rule):
    assert glob_policy.decide(task).rule == rule
    assert glob_policy.decide_uncached(task) == glob_policy.decide(task)


def test_reasons_name_the_glob_and_comparisons(glob_policy):
    reasons = glob_policy.decide(facts(dag_id="kpi_7", task_id="render")).reasons
    assert "dag_id 'kpi_7' matches 'kpi_?' of rule 'reports'" in reasons
    assert "task_id 'render' matches 'render*' of rule 'reports'" in reasons
    reasons = glob_policy.decide(facts(expected_duration_s=300, memory_mb=2048, memory_source="x")).reasons
    assert "expected duration 5m from task_facts >= 1m and < 10m, as rule 'mid-sized' requires" in reasons
    assert "memory 2048 MB from x > 1024 MB, as rule 'mid-sized' requires" in reasons


def test_explain_says_why_each_earlier_rule_did_not_match(glob_policy):
    decision = glob_policy.explain(facts(dag_id="x", pool="default_pool", expected_duration_s=30))
    assert decision.rule == "rest"
    assert decision.reasons[1:6] == (
        "rule 'reports' does not match: dag_id 'x' matches none of 'report_*' or 'kpi_?'",
        "rule 'bash' does not match: operator (not set) is not 'BashOperator'",
        "rule 'exact python' does not match: operator (not set) is not"
        " 'airflow.providers.standard.operators.python.PythonOperator'",
        "rule 'pooled' does not match: pool 'default_pool' is not 'db' or 'warehouse'",
        "rule 'mid-sized' does not match: expected duration 30s from task_facts is not >= 1m",
    )
    without_trace = glob_policy.decide_uncached(
        facts(dag_id="x", pool="default_pool", expected_duration_s=30)
    )
    assert (without_trace.executor, without_trace.rule) == (decision.executor, decision.rule)
    assert len(without_trace.reasons) == len(decision.reasons) - 5


def test_overflow_and_fallback_drop_executors_the_task_does_not_fit():
    policy = load(
        policy_text(
            """
            - name: pooled
              if: {pool: db}
              run_on: local
              overflow: [lambda]
              fallback: [lambda]
            - {name: rest, run_on: local}
            """
        )
    )
    small = policy.decide(facts(pool="db"))
    assert (small.overflow, small.fallback) == (("lambda",), ("lambda",))
    big = policy.decide(facts(pool="db", memory_mb=20480))
    assert (big.overflow, big.fallback) == ((), ())
    assert "overflow 'lambda' dropped: memory 20480 MB exceeds lambda's max_memory_mb 10240" in big.reasons
    assert "fallback 'lambda' dropped: memory 20480 MB exceeds lambda's max_memory_mb 10240" in big.reasons


def test_no_rule_matches_uses_defaults_run_on():
    policy = load(policy_text("- {name: q, if: {queue: lambda}, run_on: lambda}\n"))
    decision = policy.decide(facts(queue="default"))
    assert (decision.executor, decision.rule, decision.rule_index) == ("local", "defaults.run_on", -1)
    assert decision.reasons[-1] == "no rule took the task; defaults.run_on sends it to local"


def test_decision_to_dict_is_json_ready(default_policy):
    decision = default_policy.decide(facts(queue="lambda"))
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["executor"] == "lambda"
    assert data["rule"] == "pinned to lambda by queue"
    assert data["overflow"] == ["local"]
    assert data["fallback"] == ["local"]
    assert data["reasons"] == list(decision.reasons)
    assert (data["expected_duration_s"], data["duration_source"]) == (300, "policy_default")
    assert (data["memory_mb"], data["memory_source"]) == (512, "policy_default")


def test_decide_caches_per_facts(default_policy):
    policy = load_policy(DEFAULT_POLICY)  # its own cache, untouched by other tests
    first = policy.decide(facts(queue="lambda"))
    assert policy.cache_info()[:2] == (0, 1)
    again = policy.decide(facts(queue="lambda"))
    assert again is first
    assert policy.cache_info()[:2] == (1, 1)
    other = policy.decide(facts(queue="lambda", pool="p"))
    assert other is not first
    assert policy.cache_info() == (1, 2, 65536, 2)
    assert policy.decide_uncached(facts(queue="lambda")) == first
    assert policy.decide_uncached(facts(queue="lambda")) is not first
    policy.cache_clear()
    assert policy.cache_info() == (0, 0, 65536, 0)


def test_cache_is_bounded_and_per_policy():
    text = policy_text("- {name: rest, run_on: local}\n")
    policy, twin = load(text), load(text)
    for number in range(70_000):
        policy.decide(facts(task_id=f"t{number}"))
    assert policy.cache_info().currsize == 65536
    assert twin.cache_info().currsize == 0


def test_task_facts_are_hashable_values():
    assert facts(queue="a") == facts(queue="a")
    assert hash(facts(queue="a")) == hash(facts(queue="a"))
    assert len({facts(queue="a"), facts(queue="a"), facts(queue="b")}) == 2
    with pytest.raises(AttributeError):
        facts().queue = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expected_duration_s", float("nan")),
        ("expected_duration_s", float("inf")),
        ("expected_duration_s", -1.0),
        ("expected_duration_s", True),
        ("memory_mb", 0),
        ("memory_mb", float("nan")),
        ("memory_mb", "512"),
    ],
)
def test_task_facts_reject_figures_no_limit_check_could_judge(field, value):
    with pytest.raises(ValueError, match=f"TaskFacts.{field} must be a finite number"):
        facts(**{field: value})


def test_decision_is_frozen(default_policy):
    decision: Decision = default_policy.decide(facts())
    with pytest.raises(AttributeError):
        decision.executor = "local"  # type: ignore[misc]


def test_policy_built_by_hand_must_give_every_task_a_home():
    lambda_only = {"lambda": ExecutorSpec("lambda", "x.Lambda", limits=Limits(max_duration_s=900))}
    rule = Rule(0, "all", (), "lambda", (), (), 1)
    with pytest.raises(ValueError, match=r"defaults\.run_on is required"):
        Policy(source="s", version=1, executors=lambda_only, defaults=Defaults(300, 512, None), rules=[rule])
    with pytest.raises(ValueError, match="must name an executor without limits"):
        Policy(
            source="s", version=1, executors=lambda_only, defaults=Defaults(300, 512, "lambda"), rules=[rule]
        )
    with pytest.raises(ValueError, match="names unknown executors: ecs"):
        Policy(
            source="s",
            version=1,
            executors=lambda_only,
            defaults=Defaults(300, 512, None),
            rules=[Rule(0, "all", (), "lambda", ("ecs",), (), 1)],
        )

"""Routing from measured memory: a ``run_on`` list smallest first, and the memory need learned from runs."""

from __future__ import annotations

import textwrap
from datetime import datetime, timedelta, timezone

import pytest

from hybrid_router.router.policy import (
    LearnedMemory,
    MemoryEvidence,
    OutOfMemory,
    Policy,
    Rule,
    TaskFacts,
    learned_memory_need,
    load_policy_text,
    resolve_facts,
)
from hybrid_router.router.policy.model import Defaults, ExecutorSpec, Limits

SIZED = textwrap.dedent(
    """\
    version: 1
    executors:
      lambda:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 512}
      lambda_3g:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 3072}
      local: {class: LocalExecutor}
    defaults: {expected_duration: 5m, memory_mb: 256, run_on: local}
    settings: {memory_headroom: 1.2, learn_after_runs: 5}
    rules:
      - name: short
        if: {expected_duration: "< 12m"}
        run_on: [lambda, lambda_3g]
        overflow: [local]
        fallback: {out_of_memory: [lambda_3g, local], timeout: [local], default: [local]}
      - name: everything else
        run_on: local
    """
)
OOM_AT = datetime(2026, 3, 2, 10, 15, 7, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def sized() -> Policy:
    return load_policy_text(SIZED, "sized.yaml")


def facts(**overrides) -> TaskFacts:
    return TaskFacts(**{"dag_id": "etl", "task_id": "load", **overrides})


def measured(runs: int, p95: float | None, oom: OutOfMemory | None = None) -> MemoryEvidence:
    return MemoryEvidence(runs=runs, p95_peak_mb=p95, out_of_memory=oom)


def oom_on_lambda(limit_mb: int = 512, executor: str = "lambda") -> OutOfMemory:
    return OutOfMemory(limit_mb=limit_mb, executor=executor, at=OOM_AT)


# -- run_on lists -------------------------------------------------------------------------------------------


def test_settings_are_read(sized):
    assert (sized.memory_headroom, sized.learn_after_runs) == (1.2, 5)
    assert sized.rules[0].run_on == ("lambda", "lambda_3g")


def test_without_settings_the_builtin_learning_defaults_apply():
    policy = load_policy_text(SIZED.replace("settings: {memory_headroom: 1.2, learn_after_runs: 5}\n", ""))
    assert (policy.memory_headroom, policy.learn_after_runs) == (1.2, 5)


def test_a_task_that_fits_the_smallest_goes_there(sized):
    decision = sized.decide(facts(memory_mb=500, memory_source="executor_config"))
    assert decision.executor == "lambda"
    assert decision.overflow == ("local",)
    assert decision.fallback_for("out_of_memory") == ("lambda_3g", "local")


def test_a_task_too_big_for_the_first_goes_to_the_next_and_says_why(sized):
    decision = sized.explain(facts(memory_mb=600, memory_source="executor_config"))
    assert (decision.executor, decision.rule) == ("lambda_3g", "short")
    assert (
        "rule 'short' passes over lambda: memory 600 MB exceeds lambda's max_memory_mb 512"
        in decision.reasons
    )
    assert decision.reasons[-1] == "rule 'short' sends the task to lambda_3g"
    # the chosen executor is never its own fallback; smaller ones that cannot take the task are dropped
    assert decision.fallback_for("out_of_memory") == ("local",)


def test_a_task_too_big_for_every_entry_skips_the_rule(sized):
    decision = sized.explain(facts(memory_mb=4096, memory_source="executor_config"))
    assert decision.executor == "local"
    assert (
        "rule 'short' skipped: memory 4096 MB exceeds lambda's max_memory_mb 512; "
        "memory 4096 MB exceeds lambda_3g's max_memory_mb 3072"
    ) in decision.reasons


def test_a_single_name_keeps_its_meaning():
    text = SIZED.replace("run_on: [lambda, lambda_3g]", "run_on: lambda")
    policy = load_policy_text(text)
    assert policy.rules[0].run_on == ("lambda",)
    assert policy.decide(facts(memory_mb=600, memory_source="executor_config")).executor == "local"


def test_overflow_may_name_a_later_run_on_entry():
    text = SIZED.replace("overflow: [local]", "overflow: [lambda_3g, local]")
    policy = load_policy_text(text)
    small = policy.decide(facts(memory_mb=100, memory_source="executor_config"))
    assert (small.executor, small.overflow) == ("lambda", ("lambda_3g", "local"))
    big = policy.decide(facts(memory_mb=1000, memory_source="executor_config"))
    assert (big.executor, big.overflow) == ("lambda_3g", ("local",))


def test_rules_built_by_hand_take_a_name_or_a_tuple():
    assert Rule(0, "r", (), "local", (), (), 1).run_on == ("local",)
    assert Rule(0, "r", (), ("a", "b"), (), (), 1).run_on == ("a", "b")
    with pytest.raises(ValueError, match="at least one run_on"):
        Rule(0, "r", (), (), (), (), 1)


def test_a_catch_all_with_an_unlimited_entry_gives_every_task_a_home():
    executors = {
        "lambda": ExecutorSpec("lambda", "x.Lambda", limits=Limits(max_memory_mb=512)),
        "local": ExecutorSpec("local", "LocalExecutor"),
    }
    policy = Policy(
        source="<test>",
        version=1,
        executors=executors,
        defaults=Defaults(300, 512, None),
        rules=[Rule(0, "all", (), ("lambda", "local"), (), (), 1)],
    )
    assert policy.decide(facts(memory_mb=100)).executor == "lambda"
    assert policy.decide(facts(memory_mb=1000)).executor == "local"


# -- the memory need learned from measurements ----------------------------------------------------------


def test_p95_times_headroom_from_enough_runs(sized):
    decision = sized.explain(facts(memory_evidence=measured(14, 1520.0)))
    assert (decision.memory_mb, decision.memory_source) == (1824, "measured")
    assert decision.memory_basis == "1,824 MB: p95 of 14 runs x 1.2"
    assert (
        decision.reasons[0]
        == "expected duration 5m from policy_default, memory 1,824 MB: p95 of 14 runs x 1.2"
    )
    assert decision.executor == "lambda_3g"


def test_too_few_runs_leave_the_default_and_say_so(sized):
    decision = sized.explain(facts(memory_evidence=measured(3, 2000.0)))
    assert (decision.memory_mb, decision.memory_source, decision.memory_basis) == (
        256,
        "policy_default",
        None,
    )
    assert decision.executor == "lambda"
    assert decision.reasons[0].endswith(
        "memory 256 MB from policy_default (3 measured runs, fewer than settings.learn_after_runs 5)"
    )


def test_an_out_of_memory_counts_whatever_the_number_of_runs(sized):
    decision = sized.explain(facts(memory_evidence=measured(0, None, oom_on_lambda())))
    assert (decision.memory_mb, decision.memory_source) == (513, "out_of_memory")
    assert decision.memory_basis == "more than 512 MB: out of memory on lambda at 2026-03-02 10:15:07 UTC"
    # the task's next run goes straight to the bigger function
    assert decision.executor == "lambda_3g"


def test_the_larger_of_p95_and_out_of_memory_wins():
    oom = oom_on_lambda()
    bigger_p95 = learned_memory_need(measured(10, 1000.0, oom), headroom=1.2, min_runs=5)
    assert bigger_p95 == LearnedMemory(1200, "measured", "1,200 MB: p95 of 10 runs x 1.2")
    smaller_p95 = learned_memory_need(measured(10, 300.0, oom), headroom=1.2, min_runs=5)
    assert smaller_p95 is not None and (smaller_p95.mb, smaller_p95.source) == (513, "out_of_memory")


def test_learned_need_rounds_up_without_float_noise():
    assert learned_memory_need(measured(5, 1000.0), headroom=1.1, min_runs=5).mb == 1100
    assert learned_memory_need(measured(5, 1000.4), headroom=1.0, min_runs=5).mb == 1001
    assert learned_memory_need(measured(5, 0.0), headroom=1.2, min_runs=5).mb == 1
    assert learned_memory_need(measured(1, 10.0), headroom=1.0, min_runs=1).basis == "10 MB: p95 of 1 run x 1"


def test_nothing_measured_gives_nothing_to_learn():
    assert learned_memory_need(MemoryEvidence(), headroom=1.2, min_runs=5) is None


def test_a_naive_time_is_taken_as_utc_and_an_aware_one_is_converted():
    naive = OutOfMemory(512, "lambda", datetime(2026, 3, 2, 10, 15, 7))
    paris = OutOfMemory(512, "lambda", OOM_AT.astimezone(timezone(timedelta(hours=1))))
    for oom in (naive, paris):
        learned = learned_memory_need(measured(0, None, oom), headroom=1.2, min_runs=5)
        assert learned.basis.endswith("at 2026-03-02 10:15:07 UTC")


def test_executor_config_beats_measurements(sized):
    decision = sized.decide(
        facts(
            memory_mb=100, memory_source="executor_config", memory_evidence=measured(0, None, oom_on_lambda())
        )
    )
    assert (decision.memory_mb, decision.memory_source, decision.executor) == (
        100,
        "executor_config",
        "lambda",
    )


def test_headroom_and_min_runs_come_from_the_policy():
    text = SIZED.replace(
        "memory_headroom: 1.2, learn_after_runs: 5", "memory_headroom: 2, learn_after_runs: 2"
    )
    policy = load_policy_text(text)
    decision = policy.decide(facts(memory_evidence=measured(2, 300.0)))
    assert (decision.memory_mb, decision.memory_basis) == (600, "600 MB: p95 of 2 runs x 2")
    assert decision.executor == "lambda_3g"


def test_decisions_are_cached_per_evidence(sized):
    sized.cache_clear()
    first = sized.decide(facts(memory_evidence=measured(6, 100.0)))
    again = sized.decide(facts(memory_evidence=measured(6, 100.0)))
    after_oom = sized.decide(facts(memory_evidence=measured(6, 100.0, oom_on_lambda())))
    assert first is again and after_oom.executor == "lambda_3g"
    assert sized.cache_info().hits == 1


def test_to_dict_carries_the_basis_and_the_lists_by_reason(sized):
    result = sized.decide(facts(memory_evidence=measured(14, 1520.0))).to_dict()
    assert result["memory_basis"] == "1,824 MB: p95 of 14 runs x 1.2"
    assert result["fallback_by_reason"] == {"out_of_memory": ["local"], "timeout": ["local"]}
    assert result["fallback"] == ["local"]


@pytest.mark.parametrize(
    ("headroom", "runs"), [(0.9, 5), (float("nan"), 5), (float("inf"), 5), (True, 5), (1.2, 0)]
)
def test_policy_checks_its_learning_settings(headroom, runs):
    with pytest.raises(ValueError):
        Policy(
            source="<test>",
            version=1,
            executors={"local": ExecutorSpec("local", "LocalExecutor")},
            defaults=Defaults(300, 512, "local"),
            rules=[],
            memory_headroom=headroom,
            learn_after_runs=runs,
        )


# -- the evidence and its lookup --------------------------------------------------------------------------


class Measurements:
    def __init__(self, answer):
        self.answer = answer
        self.calls: list[tuple[str, str]] = []

    def __call__(self, dag_id: str, task_id: str):
        self.calls.append((dag_id, task_id))
        return self.answer


def test_resolve_facts_keeps_the_evidence_for_the_policy():
    evidence = measured(7, 900.0)
    lookup = Measurements(evidence)
    found = resolve_facts(dag_id="d", task_id="t", memory=lookup)
    assert (found.memory_mb, found.memory_evidence) == (None, evidence)
    assert lookup.calls == [("d", "t")]


def test_resolve_facts_does_not_ask_when_executor_config_gives_memory():
    lookup = Measurements(measured(7, 900.0))
    found = resolve_facts(
        dag_id="d", task_id="t", executor_config={"hybrid_router": {"memory_mb": "1GB"}}, memory=lookup
    )
    assert (found.memory_mb, found.memory_evidence, lookup.calls) == (1024, None, [])


def test_no_lookup_or_no_measurement_behaves_as_before():
    assert resolve_facts(dag_id="d", task_id="t") == TaskFacts("d", "t")
    assert resolve_facts(dag_id="d", task_id="t", memory=Measurements(None)) == TaskFacts("d", "t")


def test_a_lookup_returning_something_else_is_named():
    with pytest.raises(ValueError, match=r"memory lookup for d\.t returned 512"):
        resolve_facts(dag_id="d", task_id="t", memory=Measurements(512))


@pytest.mark.parametrize(
    "build",
    [
        lambda: MemoryEvidence(runs=-1),
        lambda: MemoryEvidence(runs=True, p95_peak_mb=1.0),
        lambda: MemoryEvidence(runs=3),  # runs without a p95
        lambda: MemoryEvidence(runs=0, p95_peak_mb=10.0),  # a p95 of no run
        lambda: MemoryEvidence(runs=3, p95_peak_mb=float("nan")),
        lambda: MemoryEvidence(runs=3, p95_peak_mb=-1.0),
        lambda: MemoryEvidence(out_of_memory="lambda"),
        lambda: OutOfMemory(0, "lambda", OOM_AT),
        lambda: OutOfMemory(512.0, "lambda", OOM_AT),
        lambda: OutOfMemory(512, "lambda", "yesterday"),
    ],
)
def test_evidence_is_checked_when_built(build):
    with pytest.raises(ValueError):
        build()


def test_evidence_is_hashable_so_facts_stay_a_cache_key():
    one = facts(memory_evidence=measured(6, 100.0, oom_on_lambda()))
    two = facts(memory_evidence=measured(6, 100.0, oom_on_lambda()))
    assert hash(one) == hash(two) and one == two

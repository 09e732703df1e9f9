"""Property-based fuzzing of the policy loader: whatever the input, the outcome is a Policy or a PolicyError
whose issues all say file, line, column, field and message; never another exception.
"""

from __future__ import annotations

import copy
import math
import re
import textwrap
from datetime import datetime, timezone

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hybrid_router.policies import DEFAULT_POLICY
from hybrid_router.router.policy import (
    FAILURE_REASONS,
    MemoryEvidence,
    OutOfMemory,
    Policy,
    PolicyError,
    TaskFacts,
    load_policy_text,
)
from hybrid_router.router.policy.model import FALLBACK_KEYS

FILENAME = "fuzz.yaml"
DEFAULT_TEXT = DEFAULT_POLICY.read_text(encoding="utf-8")
DEFAULT_DATA = yaml.safe_load(DEFAULT_TEXT)
# The syntax the default policy does not use: run_on lists, fallback by reason, the learning settings.
LEARNING_TEXT = textwrap.dedent(
    """\
    version: 1
    executors:
      lambda:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 512}
      lambda_3g:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory: 3GB}
      local: {class: LocalExecutor}
    defaults: {expected_duration: 5m, memory_mb: 512, run_on: local}
    settings: {memory_headroom: 1.2, learn_after_runs: 5, max_fallbacks: 2}
    rules:
      - name: sized
        if: {expected_duration: "< 12m"}
        run_on: [lambda, lambda_3g]
        overflow: [local]
        fallback: {out_of_memory: [lambda_3g, local], timeout: [local], never_started: lambda_3g, default: [local]}
      - name: everything else
        run_on: [local]
    """
)
LEARNING_DATA = yaml.safe_load(LEARNING_TEXT)

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# The words of the format, so that random structures reach the semantic checks and not only the schema.
KEYWORDS = [
    "version", "executors", "defaults", "settings", "rules", "class", "max_concurrency", "limits",
    "max_duration", "max_memory_mb", "max_memory", "options", "expected_duration", "memory_mb", "run_on",
    "fallback_mode", "max_fallbacks", "name", "if", "queue", "pool", "operator", "dag_id", "task_id",
    "overflow", "fallback", "lambda", "local", "same_try", "LocalExecutor", "< 12m", "<= 3008", "15m", "<<",
    "memory_headroom", "learn_after_runs", "lambda_3g", *FALLBACK_KEYS,
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**500)
    | st.from_regex(r"\A[<>=]{0,2} ?[0-9]{1,400}(\.[0-9]*)? ?[a-zA-Z]{0,3}\Z")
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(KEYWORDS)
    | st.text(max_size=12)
)
keys = st.sampled_from(KEYWORDS) | st.text(max_size=8)
structures = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6),
    max_leaves=40,
)
# garbage that upsets YAML in many different ways: indicators, quotes, tabs, control characters, anchors
GARBAGE_PIECES = [*":-?[]{},#&*!|>'\"%@`\t\n\r \x00\x85\ufeff\u2028", "a", "1", "<<", "&x", "*x", "!!str"]
garbage = st.lists(st.sampled_from(GARBAGE_PIECES), min_size=1, max_size=6).map("".join) | st.text(max_size=4)


YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def assert_well_formed_outcome(text: str) -> Policy | None:
    try:
        policy = load_policy_text(text, FILENAME)
    except PolicyError as error:
        assert error.issues
        # YAML (and so the reported line) counts NEL, LS and PS as line breaks too.
        line_count = len(YAML_LINE_BREAK.findall(text)) + 2
        for issue in [*error.issues, *error.warnings]:
            assert issue.file == FILENAME
            assert 1 <= issue.line <= line_count, issue
            assert issue.column >= 1, issue
            assert issue.path, issue
            assert issue.message, issue
            assert "internal error" not in issue.message, issue
            assert str(issue).startswith(f"{FILENAME}:{issue.line}:{issue.column}: {issue.path}: ")
        return None
    assert isinstance(policy, Policy)
    for issue in policy.warnings:
        assert issue.severity == "warning" and issue.line >= 1 and issue.column >= 1 and issue.path
    return policy


def assert_decisions_respect_limits(policy: Policy, facts: TaskFacts) -> None:
    decision = policy.decide(facts)
    assert decision == policy.decide_uncached(facts)
    by_reason = [name for _, names in decision.fallback_by_reason for name in names]
    for name in (decision.executor, *decision.overflow, *decision.fallback, *by_reason):
        limits = policy.executors[name].limits
        assert not limits.breaches(name, decision.expected_duration_s, decision.memory_mb), (name, decision)
    assert decision.executor not in (*decision.overflow, *decision.fallback, *by_reason)
    for reason in FAILURE_REASONS:
        assert set(decision.fallback_for(reason)) <= {*decision.fallback, *by_reason}


@FUZZ
@given(st.text(max_size=300))
def test_random_text(text):
    assert_well_formed_outcome(text)


@FUZZ
@given(structures)
def test_random_yaml_structures(value):
    assert_well_formed_outcome(yaml.safe_dump(value, allow_unicode=True))


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["version", "executors", "defaults", "settings", "rules"]), structures)
)
def test_random_policy_shaped_structures(value):
    assert_well_formed_outcome(yaml.safe_dump(value, allow_unicode=True))


def _paths(value, prefix=()):
    """Every path to a value inside ``value``, for picking one to mutate."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


DEFAULT_PATHS = [path for path in _paths(DEFAULT_DATA) if path]
LEARNING_PATHS = [path for path in _paths(LEARNING_DATA) if path]


@st.composite
def mutated_default_policies(draw, base=DEFAULT_DATA, paths=DEFAULT_PATHS) -> str:
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(paths))
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(parent, (dict, list)):
            continue  # an earlier change made it a string: indexing it works, changing it does not
        if draw(st.booleans()):
            del parent[path[-1]]  # delete a key or a list item
        else:
            parent[path[-1]] = draw(structures)  # change its type (or its value)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@FUZZ
@given(mutated_default_policies(), st.data())
def test_mutated_default_policy(text, data):
    policy = assert_well_formed_outcome(text)
    if policy is not None:
        assert_decisions_respect_limits(policy, data.draw(task_facts))


@FUZZ
@given(mutated_default_policies(LEARNING_DATA, LEARNING_PATHS), st.data())
def test_mutated_learning_policy(text, data):
    policy = assert_well_formed_outcome(text)
    if policy is not None:
        assert_decisions_respect_limits(policy, data.draw(task_facts))


executor_names = st.sampled_from(["lambda", "lambda_3g", "local", "lamda", ""]) | st.text(max_size=6)
# well-formed lists too, so that enough policies load for their decisions to be checked
known_names = st.lists(st.sampled_from(["lambda", "lambda_3g", "local"]), min_size=1, max_size=3, unique=True)
name_lists = known_names | executor_names | st.lists(executor_names | scalars, max_size=4)
fallback_maps = st.dictionaries(
    st.sampled_from(FALLBACK_KEYS) | st.text(max_size=10), known_names | name_lists | structures, max_size=5
)


def check_rule_variant(run_on, overflow, fallback, settings_value, facts: TaskFacts) -> Policy | None:
    """The learning policy with its first rule's run_on, overflow and fallback (None: left out) replaced."""
    data = copy.deepcopy(LEARNING_DATA)
    rule = data["rules"][0]
    rule["run_on"] = run_on
    for key, value in (("overflow", overflow), ("fallback", fallback)):
        if value is None:
            rule.pop(key)
        else:
            rule[key] = value
    data["settings"] = settings_value
    policy = assert_well_formed_outcome(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    if policy is not None:
        assert_decisions_respect_limits(policy, facts)
    return policy


@FUZZ
@given(
    run_on=known_names | name_lists | structures,
    overflow=st.none() | name_lists,
    fallback=st.none() | name_lists | fallback_maps,
    settings_value=st.dictionaries(
        st.sampled_from(["memory_headroom", "learn_after_runs", "max_fallbacks", "fallback_mode"]), scalars
    ),
    facts=st.data(),
)
def test_random_run_on_lists_fallback_maps_and_settings(run_on, overflow, fallback, settings_value, facts):
    check_rule_variant(run_on, overflow, fallback, settings_value, facts.draw(task_facts))


@FUZZ
@given(
    run_on=known_names,
    overflow=st.none() | known_names,
    fallback=st.none()
    | known_names
    | st.dictionaries(st.sampled_from(FALLBACK_KEYS), known_names, min_size=1),
    facts=st.data(),
)
def test_well_formed_run_on_lists_and_fallback_maps(run_on, overflow, fallback, facts):
    check_rule_variant(run_on, overflow, fallback, {}, facts.draw(task_facts))


@FUZZ
@given(st.data())
def test_garbage_inserted_into_the_default_policy(data):
    text = DEFAULT_TEXT
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        position = data.draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:position] + data.draw(garbage) + text[position:]
    assume(text != DEFAULT_TEXT)
    assert_well_formed_outcome(text)


durations = (
    st.none()
    | st.floats(min_value=0, max_value=86400 * 7, allow_nan=False)
    | st.sampled_from([0.0, 300.0, 719.9, 720.0, 900.0, 900.1, 2400.0])
)
memories = (
    st.none() | st.integers(min_value=1, max_value=1 << 20) | st.sampled_from([512, 3008, 3009, 10240, 10241])
)
out_of_memory = st.builds(
    OutOfMemory,
    limit_mb=st.sampled_from([128, 512, 3072, 10240]) | st.integers(min_value=1, max_value=1 << 20),
    executor=st.sampled_from(["lambda", "lambda_3g", "gone"]),
    at=st.datetimes(timezones=st.none() | st.just(timezone.utc)) | st.just(datetime(2026, 3, 2)),
)


@st.composite
def memory_evidence(draw) -> MemoryEvidence | None:
    if draw(st.booleans()):
        return None
    runs = draw(st.integers(min_value=0, max_value=50))
    peak = None if runs == 0 else draw(st.floats(min_value=0, max_value=1 << 20, allow_nan=False))
    return MemoryEvidence(runs=runs, p95_peak_mb=peak, out_of_memory=draw(st.none() | out_of_memory))


task_facts = st.builds(
    TaskFacts,
    dag_id=st.sampled_from(["etl_daily", "report", "x"]) | st.text(max_size=8),
    task_id=st.text(max_size=8),
    queue=st.none() | st.sampled_from(["lambda", "default"]),
    pool=st.none() | st.sampled_from(["default_pool"]),
    operator=st.none() | st.sampled_from(["BashOperator", "a.b.PythonOperator"]),
    expected_duration_s=durations,
    memory_mb=memories,
    memory_evidence=memory_evidence(),
)


@FUZZ
@given(task_facts)
def test_default_policy_never_breaks_an_executor_limit(facts):
    policy = _default_policy()
    assert_decisions_respect_limits(policy, facts)
    decision = policy.decide(facts)
    assert math.isfinite(decision.expected_duration_s)
    evidence = facts.memory_evidence
    if facts.memory_mb is None and evidence is not None and evidence.out_of_memory is not None:
        # an out-of-memory death is a measurement whatever the number of runs: the need is above that size
        assert decision.memory_mb > evidence.out_of_memory.limit_mb


def _default_policy(cache: list[Policy] = []) -> Policy:  # noqa: B006 - loaded once for all examples
    if not cache:
        cache.append(load_policy_text(DEFAULT_TEXT, FILENAME))
    return cache[0]

"""The shipped policy and its JSON Schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from hybrid_router.policies import DEFAULT_POLICY, SCHEMA
from hybrid_router.router.policy import load_policy, load_policy_text


@pytest.fixture(scope="module")
def schema():
    data = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(data)
    return data


def test_default_policy_validates_against_the_schema(schema):
    jsonschema.Draft202012Validator(schema).validate(
        yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    )


def test_default_policy_loads_with_the_documented_executors_and_rules():
    policy = load_policy(DEFAULT_POLICY)
    assert policy.version == 1
    assert policy.source == str(DEFAULT_POLICY)
    lambda_spec, local = policy.executors["lambda"], policy.executors["local"]
    assert lambda_spec.class_path == "hybrid_router.lambda_exec.LambdaExecutor"
    assert (lambda_spec.limits.max_duration_s, lambda_spec.limits.max_memory_mb) == (900, 10240)
    assert lambda_spec.options == {"function_name": "airflow-task"}
    assert local.class_path == "LocalExecutor"
    assert local.limits.is_unlimited
    assert (policy.defaults.expected_duration_s, policy.defaults.memory_mb, policy.defaults.run_on) == (
        300,
        512,
        "local",
    )
    assert (policy.fallback_mode, policy.max_fallbacks) == ("same_try", 2)
    assert [(rule.name, rule.run_on, rule.overflow, rule.fallback) for rule in policy.rules] == [
        ("pinned to lambda by queue", ("lambda",), ("local",), ("local",)),
        ("short and small", ("lambda",), ("local",), ("local",)),
        ("everything else", ("local",), (), ()),
    ]
    # the queue-pinned rule has no duration or memory bound: documented in the file, and warned about
    run_on_line = _line_of(DEFAULT_POLICY.read_text(encoding="utf-8"), "    run_on: lambda", 0)
    assert [(str(issue), issue.severity) for issue in policy.warnings] == [
        (
            f"{DEFAULT_POLICY}:{run_on_line}:13: rules[0].run_on: rule 'pinned to lambda by queue' admits tasks"
            " longer than"
            " lambda's max_duration 15m (it has no expected_duration condition); such tasks skip this rule",
            "warning",
        ),
        (
            f"{DEFAULT_POLICY}:{run_on_line}:13: rules[0].run_on: rule 'pinned to lambda by queue' admits tasks"
            " bigger than"
            " lambda's max_memory_mb 10240 (it has no memory_mb condition); such tasks skip this rule",
            "warning",
        ),
    ]


def test_limit_warnings_for_loose_conditions():
    text = (
        DEFAULT_POLICY.read_text(encoding="utf-8")
        .replace('"< 12m"', '"< 20m"')
        .replace('"<= 3008"', '"<= 10GB"')
    )
    warnings = [str(issue) for issue in load_policy_text(text, "p.yaml").warnings]
    assert (
        f"p.yaml:{_line_of(text, '    run_on: lambda', 1)}:13: rules[1].run_on: rule 'short and small' admits tasks longer than lambda's max_duration 15m"
        " (its expected_duration condition allows more); such tasks skip this rule"
    ) in warnings
    assert not any("bigger than" in warning and "short and small" in warning for warning in warnings)


def test_every_schema_key_has_a_description(schema):
    missing = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.get("properties", {}).items():
                if "description" not in value and "$ref" not in value:
                    missing.append(f"{where}.{key}")
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")

    walk(schema, "$")
    assert missing == []


def _line_of(text: str, line_start: str, occurrence: int) -> int:
    numbers = [number for number, line in enumerate(text.splitlines(), 1) if line.startswith(line_start)]
    return numbers[occurrence]

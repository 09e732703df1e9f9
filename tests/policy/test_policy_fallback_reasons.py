"""``fallback`` by failure reason and ``run_on`` lists: what the loader accepts, and the errors it reports."""

from __future__ import annotations

import json
import textwrap

import pytest

from hybrid_router.child_protocol import InfrastructureFailure
from hybrid_router.lambda_exec import executor as lambda_executor
from hybrid_router.lambda_exec.protocol import Outcome
from hybrid_router.policies import SCHEMA
from hybrid_router.router.policy import FAILURE_REASONS, fallback_for_reason, load_policy_text
from hybrid_router.router.policy.model import DEFAULT_REASON, FALLBACK_KEYS, REASON_GROUPS

from .policy_texts import errors_of

HEAD = textwrap.dedent(
    """\
    version: 1
    executors:
      lambda:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 512}
      lambda_3g:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 3072}
      lambda_short:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 5m, max_memory_mb: 10240}
      local: {class: LocalExecutor}
    defaults: {run_on: local}
    rules:
    """
)
FIRST_RULE_LINE = HEAD.count("\n") + 1


def with_rule(rule: str) -> str:
    return (
        HEAD + textwrap.indent(textwrap.dedent(rule).strip("\n"), "  ") + "\n  - {name: all, run_on: local}\n"
    )


def load(rule: str):
    return load_policy_text(with_rule(rule), "policy.yaml")


def line(offset: int) -> int:
    return FIRST_RULE_LINE + offset


# -- the reasons ---------------------------------------------------------------------------------------------


def test_the_policy_knows_every_reason_a_child_reports():
    # kept in step by hand: the policy engine does not import the Lambda executor
    reported = {outcome.value for outcome in Outcome if outcome.is_infrastructure}
    reported |= {lambda_executor.REASON_CREDENTIALS, lambda_executor.REASON_INVOKE_REJECTED}
    assert set(FAILURE_REASONS) == reported
    assert all(members <= set(FAILURE_REASONS) for members in REASON_GROUPS.values())


def test_the_schema_lists_the_same_reasons():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert tuple(schema["$defs"]["fallback"]["propertyNames"]["enum"]) == FALLBACK_KEYS


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("out_of_memory", ("lambda_3g", "local")),  # its own list
        ("throttled", ("lambda_3g",)),  # its group's
        ("runtime_crash", ("local",)),  # default
    ],
)
def test_a_reason_takes_its_own_list_then_its_group_then_default(reason, expected):
    lists = {
        "out_of_memory": ["lambda_3g", "local"],
        "never_started": ["lambda_3g"],
        DEFAULT_REASON: ["local"],
    }
    assert fallback_for_reason(lists, reason) == expected


def test_a_reason_with_no_list_and_no_default_has_no_fallback():
    assert fallback_for_reason({"timeout": ["local"]}, "out_of_memory") == ()


def test_an_exact_reason_wins_over_its_group():
    assert fallback_for_reason({"never_started": ["a"], "throttled": ["b"]}, "throttled") == ("b",)


# -- loading a map by reason -----------------------------------------------------------------------------------


def test_a_map_by_reason_loads_in_file_order():
    policy = load(
        """
        - name: q
          if: {queue: lambda}
          run_on: lambda
          fallback: {out_of_memory: [lambda_3g, local], timeout: local, default: [local]}
        """
    )
    rule = policy.rules[0]
    assert rule.fallback == ("local",)
    assert rule.fallback_by_reason == (("out_of_memory", ("lambda_3g", "local")), ("timeout", ("local",)))
    assert rule.fallback_executors == ("local", "lambda_3g")
    assert [issue for issue in policy.warnings if issue.path.startswith("rules[0].fallback")] == []


def test_a_plain_list_keeps_its_meaning():
    policy = load(
        """
        - name: q
          if: {queue: lambda}
          run_on: lambda
          fallback: [lambda_3g, local]
        """
    )
    decision = policy.decide_uncached(_facts(queue="lambda"))
    assert decision.fallback == ("lambda_3g", "local") and decision.fallback_by_reason == ()
    assert (
        decision.fallback_for("timeout") == decision.fallback_for("out_of_memory") == ("lambda_3g", "local")
    )


def test_a_map_without_default_is_warned_about():
    policy = load(
        """
        - name: q
          if: {queue: lambda}
          run_on: lambda
          fallback: {out_of_memory: [lambda_3g], never_started: [local]}
        """
    )
    assert [str(issue) for issue in policy.warnings if issue.path == "rules[0].fallback"] == [
        f"policy.yaml:{line(3)}:15: rules[0].fallback: no 'default' list: a run that dies of timeout, "
        "runtime_crash, dead_lettered, unreported is not re-run"
    ]


def test_an_unknown_reason_is_an_error_at_its_key():
    assert errors_of(
        with_rule(
            """
            - name: q
              if: {queue: lambda}
              run_on: lambda
              fallback: {out_of_memry: [lambda_3g], default: [local]}
            """
        )
    ) == [
        f"policy.yaml:{line(3)}:16: rules[0].fallback.out_of_memry: unknown failure reason 'out_of_memry' "
        "(did you mean 'out_of_memory'?); use " + ", ".join(FALLBACK_KEYS)
    ]


def test_errors_inside_a_map_name_the_reason():
    assert errors_of(
        with_rule(
            """
            - name: q
              if: {queue: lambda}
              run_on: lambda
              fallback: {timeout: [loca, local, local], default: lambda, out_of_memory: {a: 1}}
            """
        )
    ) == [
        f"policy.yaml:{line(3)}:26: rules[0].fallback.timeout[0]: unknown executor 'loca' (did you mean 'local'?)",
        f"policy.yaml:{line(3)}:39: rules[0].fallback.timeout[2]: 'local' is listed twice in fallback.timeout",
        f"policy.yaml:{line(3)}:56: rules[0].fallback.default: 'lambda' is this rule's run_on; "
        "fallback.default must name other executors",
        f"policy.yaml:{line(3)}:79: rules[0].fallback.out_of_memory: expected a list or a string, got a mapping",
    ]


def test_an_empty_map_is_an_error():
    assert errors_of(
        with_rule(
            """
            - name: q
              if: {queue: lambda}
              run_on: lambda
              fallback: {}
            """
        )
    ) == [f"policy.yaml:{line(3)}:15: rules[0].fallback: must not be empty"]


# -- a fallback that cannot help -------------------------------------------------------------------------------


def test_a_lambda_after_a_timeout_at_the_same_cap_cannot_help():
    assert errors_of(
        with_rule(
            """
            - name: q
              if: {queue: lambda}
              run_on: lambda
              fallback: {timeout: [lambda_3g, local], default: [local]}
            """
        )
    ) == [
        f"policy.yaml:{line(3)}:26: rules[0].fallback.timeout[0]: 'lambda_3g' cannot help after timeout: its "
        "max_duration 15m is no more than lambda's 15m, so a run that died there would die the same way"
    ]


def test_a_longer_limit_helps_after_a_timeout():
    policy = load(
        """
        - name: q
          if: {queue: lambda}
          run_on: lambda_short
          fallback: {timeout: [lambda, local], default: [local]}
        """
    )
    assert policy.rules[0].fallback_by_reason == (("timeout", ("lambda", "local")),)


def test_a_function_no_bigger_cannot_help_after_out_of_memory():
    assert errors_of(
        with_rule(
            """
            - name: q
              if: {queue: lambda}
              run_on: lambda_3g
              fallback: {out_of_memory: lambda, default: [local]}
            """
        )
    ) == [
        f"policy.yaml:{line(3)}:31: rules[0].fallback.out_of_memory: 'lambda' cannot help after out_of_memory: "
        "its max_memory_mb 512 MB is no more than lambda_3g's 3072 MB, so a run that died there would die the "
        "same way"
    ]


def test_a_bigger_function_helps_after_out_of_memory_on_the_first_of_a_run_on_list():
    policy = load(
        """
        - name: q
          if: {queue: lambda}
          run_on: [lambda, lambda_3g]
          fallback: {out_of_memory: [lambda_3g, local], default: [local]}
        """
    )
    assert policy.rules[0].fallback_by_reason == (("out_of_memory", ("lambda_3g", "local")),)


def test_executors_without_the_limit_are_not_taken_to_die_of_it():
    # local (overflow) has no duration limit: only lambda can time out, and lambda_short cannot help after it
    assert errors_of(
        with_rule(
            """
                - name: q
                  if: {queue: lambda}
                  run_on: lambda
                  overflow: [local]
                  fallback: {timeout: [lambda_short], default: [local]}
                """
        )
    )[0].split(": ", 2)[1:] == [
        "rules[0].fallback.timeout[0]",
        "'lambda_short' cannot help after timeout: its max_duration 5m is no more than lambda's 15m, so a "
        "run that died there would die the same way",
    ]


def test_plain_lists_and_other_reasons_are_not_judged():
    load(
        """
        - name: q
          if: {queue: lambda}
          run_on: lambda
          fallback: {runtime_crash: [lambda_3g], default: [lambda_3g, local]}
        """
    )


# -- run_on lists ---------------------------------------------------------------------------------------------


def test_run_on_entries_that_can_never_be_chosen_are_errors():
    assert errors_of(
        with_rule(
            """
            - name: q
              if: {queue: lambda}
              run_on: [lambda_3g, lambda, lambda_3g, local, lambda_short]
            """
        )
    ) == [
        f"policy.yaml:{line(2)}:25: rules[0].run_on[1]: can never be chosen: 'lambda_3g' before it takes every "
        "task 'lambda' could take; list run_on executors smallest first",
        f"policy.yaml:{line(2)}:33: rules[0].run_on[2]: 'lambda_3g' is listed twice in run_on",
        f"policy.yaml:{line(2)}:51: rules[0].run_on[4]: can never be chosen: 'local' before it takes every "
        "task 'lambda_short' could take; list run_on executors smallest first",
    ]


def test_run_on_list_errors_are_located():
    assert errors_of(
        with_rule(
            """
            - name: q
              if: {queue: lambda}
              run_on: [lambda, lamda, 'bad name']
              overflow: [lambda]
            """
        )
    ) == [
        f"policy.yaml:{line(2)}:22: rules[0].run_on[1]: unknown executor 'lamda' (did you mean 'lambda'?)",
        f"policy.yaml:{line(2)}:29: rules[0].run_on[2]: invalid executor name 'bad name': use letters, digits, "
        "'_' and '-', starting with a letter or '_'",
        f"policy.yaml:{line(3)}:16: rules[0].overflow[0]: 'lambda' is first in this rule's run_on; overflow must "
        "name other executors",
    ]


def test_an_empty_run_on_list_is_an_error():
    assert errors_of(with_rule("- {name: q, if: {queue: a}, run_on: []}")) == [
        f"policy.yaml:{line(0)}:39: rules[0].run_on: must not be empty"
    ]


def test_a_catch_all_list_with_an_unlimited_entry_shadows_later_rules():
    text = (
        HEAD + "  - {name: all, run_on: [lambda, local]}\n  - {name: never, if: {queue: a}, run_on: local}\n"
    )
    assert errors_of(text) == [
        f"policy.yaml:{line(1)}:5: rules[1]: can never match: shadowed by catch-all rule 'all' at line {line(0)}"
    ]


def test_a_catch_all_list_with_an_unlimited_entry_needs_no_defaults_run_on():
    text = HEAD.replace("defaults: {run_on: local}\n", "") + "  - {name: all, run_on: [lambda, local]}\n"
    policy = load_policy_text(text)
    assert policy.decide(_facts(memory_mb=100)).executor == "lambda"


def test_limits_warning_counts_the_largest_entry():
    policy = load(
        """
        - name: q
          if: {queue: lambda}
          run_on: [lambda, lambda_3g]
        """
    )
    assert [issue.message for issue in policy.warnings if issue.path == "rules[0].run_on"] == [
        "rule 'q' admits tasks longer than lambda's max_duration 15m (it has no expected_duration condition); "
        "such tasks skip this rule",
        "rule 'q' admits tasks bigger than lambda_3g's max_memory_mb 3072 (it has no memory_mb condition); "
        "such tasks skip this rule",
    ]


def test_executors_used_only_in_a_map_or_a_run_on_list_are_used():
    policy = load(
        """
        - name: q
          if: {queue: lambda}
          run_on: [lambda, lambda_3g]
          fallback: {timeout: [local], default: [lambda_short]}
        """
    )
    assert not [issue for issue in policy.warnings if "is not used" in issue.message]


# -- settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("{memory_headroom: 0.5}", "settings.memory_headroom: must be at least 1, got number 0.5"),
        ("{memory_headroom: .nan}", "settings.memory_headroom: must be a finite number, got number nan"),
        ("{memory_headroom: many}", "settings.memory_headroom: expected a number, got string 'many'"),
        ("{learn_after_runs: 0}", "settings.learn_after_runs: must be at least 1, got integer 0"),
        ("{learn_after_runs: 2.5}", "settings.learn_after_runs: expected an integer, got number 2.5"),
        ("{learn_afterruns: 3}", "settings.learn_afterruns: unknown key 'learn_afterruns' (did you mean"),
    ],
)
def test_learning_settings_are_checked(settings, message):
    text = HEAD.replace("defaults: {run_on: local}\n", f"defaults: {{run_on: local}}\nsettings: {settings}\n")
    errors = errors_of(text + "  - {name: all, run_on: local}\n")
    assert len(errors) == 1 and message in errors[0], errors


def test_a_failure_carries_the_reason_the_lists_are_keyed_by():
    assert InfrastructureFailure(reason="out_of_memory").reason in FAILURE_REASONS


def _facts(**overrides):
    from hybrid_router.router.policy import TaskFacts

    return TaskFacts(**{"dag_id": "d", "task_id": "t", **overrides})

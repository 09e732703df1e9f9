"""Every kind of error a policy file can have, each with its exact ``file:line:col: path:`` prefix."""

from __future__ import annotations

import pickle

import pytest

from hybrid_router.router.policy import PolicyError, PolicyIssue, load_policy, load_policy_text

from .policy_texts import BASE_POLICY, errors_of, load, policy_text


def test_issue_formats_as_file_line_column_path_message():
    issue = PolicyIssue("policy.yaml", 14, 7, "rules[2].run_on", "unknown executor 'lamda'")
    assert str(issue) == "policy.yaml:14:7: rules[2].run_on: unknown executor 'lamda'"
    assert issue.severity == "error"


def test_policy_error_is_a_value_error_with_one_issue_per_line():
    error = PolicyError([PolicyIssue("p", 3, 1, "b", "second"), PolicyIssue("p", 1, 1, "a", "first")])
    assert isinstance(error, ValueError)
    assert str(error) == "p:1:1: a: first\np:3:1: b: second"


def test_policy_error_survives_pickling():
    error = PolicyError([PolicyIssue("p", 1, 2, "a", "bad")], [PolicyIssue("p", 3, 4, "b", "meh", "warning")])
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.issues, copy.warnings, str(copy)) == (error.issues, error.warnings, str(error))


def test_yaml_syntax_error_uses_the_mark_of_the_problem():
    text = "version: 1\nexecutors:\n  local: {class: LocalExecutor\nrules: []\n"
    [message] = errors_of(text)
    assert message.startswith("policy.yaml:4:6: (document): invalid YAML: ")


def test_tab_indentation_is_a_syntax_error_with_position():
    [message] = errors_of("version: 1\nrules:\n\t- name: x\n")
    assert message.startswith("policy.yaml:3:1: (document): invalid YAML: found character '\\t'")


def test_two_documents_are_rejected():
    [message] = errors_of("version: 1\n---\nversion: 1\n")
    assert message.startswith("policy.yaml:2:1: (document): invalid YAML: but found another document")


def test_empty_file():
    assert errors_of("") == [
        "policy.yaml:1:1: (document): the file is empty; a policy needs at least 'version' and 'rules'"
    ]


def test_document_that_is_not_a_mapping():
    assert errors_of("- a\n- b\n") == ["policy.yaml:1:1: (document): expected a mapping, got a list"]


def test_missing_version_and_rules():
    text = "executors:\n  local: {class: LocalExecutor}\n"
    assert errors_of(text) == [
        "policy.yaml:1:1: rules: missing required key 'rules'",
        "policy.yaml:1:1: version: missing required key 'version'",
    ]


def test_unsupported_version():
    text = BASE_POLICY.replace("version: 1", "version: 3") + "  - {name: all, run_on: local}\n"
    assert errors_of(text) == [
        "policy.yaml:1:10: version: unsupported version 3: this release reads version 1"
    ]


def test_unknown_key_at_top_level_with_did_you_mean():
    text = BASE_POLICY + "  - {name: all, run_on: local}\nsetings: {max_fallbacks: 1}\n"
    assert errors_of(text) == ["policy.yaml:11:1: setings: unknown key 'setings' (did you mean 'settings'?)"]


def test_unknown_key_in_a_rule_points_at_the_key():
    text = policy_text(
        """
        - name: all
          rnu_on: local
          run_on: local
        """
    )
    assert errors_of(text) == [
        "policy.yaml:11:5: rules[0].rnu_on: unknown key 'rnu_on' (did you mean 'run_on'?)"
    ]


def test_unknown_condition_key():
    text = policy_text(
        """
        - name: q
          if: {queu: lambda}
          run_on: lambda
        - {name: all, run_on: local}
        """
    )
    assert errors_of(text) == [
        "policy.yaml:11:10: rules[0].if.queu: unknown key 'queu' (did you mean 'queue'?)"
    ]


def test_wrong_types():
    text = policy_text(
        """
        - name: 5
          if: {queue: [a, 7], expected_duration: true}
          run_on: {lambda: 1}
          overflow: {local: 1}
        - {name: all, run_on: local}
        """
    )
    assert errors_of(text) == [
        "policy.yaml:10:11: rules[0].name: expected a string, got integer 5",
        "policy.yaml:11:21: rules[0].if.queue[1]: expected a string, got integer 7",
        "policy.yaml:11:44: rules[0].if.expected_duration: expected a string or a list, got boolean true",
        "policy.yaml:12:13: rules[0].run_on: expected a list or a string, got a mapping",
        "policy.yaml:13:15: rules[0].overflow: expected a list or a string, got a mapping",
    ]


def test_wrong_type_of_executor_and_settings_values():
    text = (
        "version: 1\n"
        "executors:\n"
        "  local: {class: LocalExecutor, max_concurrency: many}\n"
        "  lambda: nothing\n"
        "settings: {max_fallbacks: -1, fallback_mode: next-try}\n"
        "rules:\n"
        "  - {name: all, run_on: local}\n"
    )
    assert errors_of(text) == [
        "policy.yaml:3:50: executors.local.max_concurrency: expected an integer or null, got string 'many'",
        "policy.yaml:4:11: executors.lambda: expected a mapping, got string 'nothing'",
        "policy.yaml:5:27: settings.max_fallbacks: must be at least 0, got integer -1",
        "policy.yaml:5:46: settings.fallback_mode: string 'next-try' is not one of 'same_try', 'next_try'"
        " (did you mean 'next_try'?)",
    ]


def test_unknown_executor_references_everywhere():
    text = (
        BASE_POLICY.replace("run_on: local}", "run_on: locl}")
        + "  - name: q\n"
        + "    if: {queue: lambda}\n"
        + "    run_on: lamda\n"
        + "    overflow: [local, ecs]\n"
        + "    fallback: [loca]\n"
        + "  - {name: all, run_on: local}\n"
    )
    assert errors_of(text) == [
        "policy.yaml:8:59: defaults.run_on: unknown executor 'locl' (did you mean 'local'?)",
        "policy.yaml:12:13: rules[0].run_on: unknown executor 'lamda' (did you mean 'lambda'?)",
        "policy.yaml:13:23: rules[0].overflow[1]: unknown executor 'ecs'",
        "policy.yaml:14:16: rules[0].fallback[0]: unknown executor 'loca' (did you mean 'local'?)",
    ]


def test_bad_durations_and_sizes():
    text = (
        "version: 1\n"
        "executors:\n"
        "  lambda:\n"
        "    class: hybrid_router.lambda_exec.LambdaExecutor\n"
        "    limits: {max_duration: 15 mins later, max_memory: 10 gigs}\n"
        "  local: {class: LocalExecutor}\n"
        "defaults: {expected_duration: soon, memory_mb: 0, run_on: local}\n"
        "rules:\n"
        "  - name: short\n"
        '    if: {expected_duration: "< 12 parsecs", memory_mb: ["> 1GB", "<= lots"]}\n'
        "    run_on: lambda\n"
    )
    assert errors_of(text) == [
        "policy.yaml:5:28: executors.lambda.limits.max_duration: invalid duration '15 mins later':"
        " expected '90s', '12m', '1h30m', '1.5h' or a number of seconds",
        "policy.yaml:5:55: executors.lambda.limits.max_memory: invalid memory size '10 gigs':"
        " unknown unit 'gigs' (use MB, GB, MiB or GiB)",
        "policy.yaml:7:31: defaults.expected_duration: invalid duration 'soon':"
        " expected '90s', '12m', '1h30m', '1.5h' or a number of seconds",
        "policy.yaml:7:48: defaults.memory_mb: invalid memory size 0: must be greater than 0",
        "policy.yaml:10:29: rules[0].if.expected_duration: invalid comparison '< 12 parsecs':"
        " invalid duration '12 parsecs': unknown unit 'parsecs' (use ms, s, m, h or d)",
        "policy.yaml:10:66: rules[0].if.memory_mb[1]: invalid comparison '<= lots': invalid memory size 'lots':"
        " expected '512' or 512 (MB), '512MB', '3GB', '2GiB'",
    ]


def test_comparison_without_operator():
    text = policy_text(
        """
        - name: short
          if: {expected_duration: 12m}
          run_on: lambda
        - {name: all, run_on: local}
        """
    )
    assert errors_of(text) == [
        "policy.yaml:11:29: rules[0].if.expected_duration: invalid comparison '12m':"
        " expected an operator (<, <=, >, >=, ==) and a value, like '< 12m'"
    ]


@pytest.mark.parametrize(
    ("condition", "column", "message"),
    [
        ('expected_duration: [">= 10m", "< 5m"]', 29, "no expected duration satisfies '>= 10m' and '< 5m'"),
        ('expected_duration: "< 0"', 29, "no expected duration satisfies '< 0'"),
        ('memory_mb: [">= 1GB", "== 512"]', 21, "no memory size satisfies '>= 1GB' and '== 512'"),
        ('memory_mb: ["> 1GB", "<= 1024"]', 21, "no memory size satisfies '> 1GB' and '<= 1024'"),
    ],
)
def test_comparisons_that_exclude_each_other(condition, column, message):
    text = policy_text(
        f"- name: never\n  if: {{{condition}}}\n  run_on: local\n- {{name: all, run_on: local}}\n"
    )
    assert errors_of(text) == [
        f"policy.yaml:11:{column}: rules[0].if.{condition.split(':')[0]}: can never match: {message}"
    ]


@pytest.mark.parametrize(
    "condition",
    [
        'expected_duration: [">= 5m", "<= 5m"]',
        'expected_duration: "<= 0"',
        'memory_mb: "<= 1"',
        'memory_mb: "== 3GB"',
    ],
)
def test_narrow_but_possible_comparisons_are_accepted(condition):
    load(
        policy_text(
            f"- name: narrow\n  if: {{{condition}}}\n  run_on: local\n- {{name: all, run_on: local}}\n"
        )
    )


def test_zero_limit_is_rejected():
    text = BASE_POLICY.replace("max_duration: 15m", "max_duration: 0") + "  - {name: all, run_on: local}\n"
    assert errors_of(text) == [
        "policy.yaml:5:28: executors.lambda.limits.max_duration: invalid duration 0: must be greater than 0"
    ]


def test_both_memory_forms_in_one_limits_block():
    text = (
        BASE_POLICY.replace("max_memory_mb: 10240}", "max_memory_mb: 10240, max_memory: 10GB}")
        + "  - {name: all, run_on: local}\n"
    )
    assert errors_of(text) == [
        "policy.yaml:5:55: executors.lambda.limits.max_memory: give max_memory or max_memory_mb, not both"
    ]


def test_duplicate_executor_names():
    text = BASE_POLICY.replace("  local:\n", "  lambda:\n    class: LocalExecutor\n  local:\n") + (
        "  - {name: all, run_on: local}\n"
    )
    assert errors_of(text) == [
        "policy.yaml:6:3: executors.lambda: duplicate key 'lambda' (first defined at line 3)"
    ]


def test_duplicate_keys_anywhere_are_found():
    text = policy_text(
        """
        - name: all
          run_on: local
          run_on: lambda
        """
    )
    assert errors_of(text) == [
        "policy.yaml:12:5: rules[0].run_on: duplicate key 'run_on' (first defined at line 11)"
    ]


def test_duplicate_rule_names():
    text = policy_text(
        """
        - {name: same, if: {queue: a}, run_on: local}
        - {name: same, if: {queue: b}, run_on: local}
        """
    )
    assert errors_of(text) == [
        "policy.yaml:11:12: rules[1].name: duplicate rule name 'same' (first used by rules[0] at line 10)"
    ]


def test_empty_rule_list():
    assert errors_of(BASE_POLICY.replace("rules:\n", "rules: []\n")) == [
        "policy.yaml:9:8: rules: must not be empty"
    ]


def test_empty_condition_block_and_empty_executors():
    text = "version: 1\nexecutors: {}\nrules:\n  - {name: x, if: {}, run_on: local}\n"
    assert errors_of(text) == [
        "policy.yaml:2:12: executors: must not be empty",
        "policy.yaml:4:19: rules[0].if: must not be empty",
    ]  # with no executors at all, each reference to one being unknown is not worth saying


def test_executor_as_its_own_overflow_or_fallback_and_listed_twice():
    text = policy_text(
        """
        - name: q
          if: {queue: lambda}
          run_on: lambda
          overflow: [lambda]
          fallback: [local, local]
        - {name: all, run_on: local}
        """
    )
    assert errors_of(text) == [
        "policy.yaml:13:16: rules[0].overflow[0]: 'lambda' is this rule's run_on; overflow must name other executors",
        "policy.yaml:14:23: rules[0].fallback[1]: 'local' is listed twice in fallback",
    ]


def test_rule_shadowed_by_a_catch_all_is_an_error():
    text = policy_text(
        """
        - name: everything
          run_on: local
        - name: never
          if: {queue: lambda}
          run_on: lambda
        """
    )
    assert errors_of(text) == [
        "policy.yaml:12:5: rules[1]: can never match: shadowed by catch-all rule 'everything' at line 10"
    ]


def test_catch_all_on_a_limited_executor_does_not_shadow():
    # tasks too long for lambda skip the first rule, so the second is reachable
    policy = load(policy_text("- {name: lambda first, run_on: lambda}\n- {name: rest, run_on: local}\n"))
    assert [rule.name for rule in policy.rules] == ["lambda first", "rest"]


def test_executor_of_last_resort_must_have_no_limits():
    text = (
        BASE_POLICY.replace("run_on: local}", "run_on: lambda}")
        + "  - {name: q, if: {queue: a}, run_on: local}\n"
    )
    assert errors_of(text) == [
        "policy.yaml:8:59: defaults.run_on: 'lambda' has limits, so a task exceeding them would have nowhere"
        " to run; name an executor without limits"
    ]


def test_defaults_run_on_required_without_an_unlimited_catch_all():
    text = BASE_POLICY.replace(", run_on: local}", "}") + "  - {name: q, if: {queue: a}, run_on: local}\n"
    assert errors_of(text) == [
        "policy.yaml:8:11: defaults.run_on: missing: no rule without 'if' sends every task to an executor"
        " without limits, so tasks that no rule takes need a defaults.run_on"
    ]


def test_unknown_short_executor_class_and_bad_import_path():
    text = (
        "version: 1\n"
        "executors:\n"
        "  local: {class: LocalExecuter}\n"
        "  ecs: {class: 'airflow.providers.amazon..AwsEcsExecutor'}\n"
        "rules:\n"
        "  - {name: all, run_on: local, overflow: [ecs]}\n"
    )
    [short_name, import_path] = errors_of(text)
    assert short_name.startswith(
        "policy.yaml:3:18: executors.local.class: unknown executor 'LocalExecuter' (did you mean 'LocalExecutor'?)"
    )
    assert import_path.startswith(
        "policy.yaml:4:16: executors.ecs.class: invalid class 'airflow.providers.amazon..AwsEcsExecutor':"
        " expected an import path like 'package.module.ExecutorClass' or a short name like 'LocalExecutor'"
    )


def test_invalid_executor_name():
    text = (
        "version: 1\nexecutors:\n  my executor: {class: LocalExecutor}\n  local: {class: LocalExecutor}\n"
        "rules:\n  - {name: a, run_on: local}\n"
    )
    assert errors_of(text) == [
        "policy.yaml:3:3: executors['my executor']: invalid executor name 'my executor':"
        " use letters, digits, '_' and '-', starting with a letter or '_'"
    ]
    text = policy_text("- {name: a, if: {queue: a}, run_on: 'lam bda'}\n")
    assert errors_of(text) == [
        "policy.yaml:10:39: rules[0].run_on: invalid executor name 'lam bda':"
        " use letters, digits, '_' and '-', starting with a letter or '_'"
    ]


def test_non_string_keys_and_yaml_tags():
    text = policy_text(
        """
        - name: all
          run_on: local
          1: x
          other: !!python/object:os.system ls
        """
    )
    messages = errors_of(text)
    assert messages[0] == "policy.yaml:12:5: rules[0]: keys must be strings, got 1; quote the key"
    assert messages[1].startswith(
        "policy.yaml:13:12: rules[0].other: invalid YAML: could not determine a constructor"
    )


def test_keys_yaml_reads_as_other_types():
    text = policy_text("- {name: all, run_on: local}\n") + "on: 1\n2020-13-45: x\n[a, b]: 2\n"
    assert errors_of(text) == [
        "policy.yaml:11:1: (document): keys must be strings, got True; quote the key",
        "policy.yaml:12:1: (document): invalid timestamp '2020-13-45': month must be in 1..12",
        "policy.yaml:13:1: (document): keys must be strings, got a collection",
    ]


def test_bad_timestamp_value_is_an_issue_not_a_crash():
    text = policy_text("- {name: all, run_on: local}\n").replace("version: 1", "version: 2020-13-45")
    [bad_date] = errors_of(text)
    assert bad_date.startswith(
        "policy.yaml:1:10: version: invalid timestamp '2020-13-45': month must be in 1..12"
    )


def test_recursive_alias_and_merge_keys():
    text = policy_text(
        """
        - &loop {name: all, run_on: local, overflow: [*loop]}
        """
    )
    messages = errors_of(text)
    assert "rules[0].overflow[0]: an alias refers to a value that contains it" in messages[0]
    # merge keys work as in PyYAML's own loader
    merged = load(
        BASE_POLICY
        + "  - &base {name: q, if: {queue: a}, run_on: lambda, overflow: [local]}\n"
        + "  - {<<: *base, name: p, if: {pool: b}}\n"
        + "  - {name: all, run_on: local}\n"
    )
    assert [(rule.name, rule.run_on, rule.overflow) for rule in merged.rules[:2]] == [
        ("q", ("lambda",), ("local",)),
        ("p", ("lambda",), ("local",)),
    ]


def test_alias_bomb_is_rejected_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    [message] = errors_of("\n".join(lines) + "\n")
    assert "document too large" in message


def test_deep_nesting_is_an_issue():
    messages = errors_of("version: 1\nexecutors: " + "[" * 200 + "]" * 200 + "\nrules: []\n")
    nested = [message for message in messages if message.endswith(": nested more than 64 levels deep")]
    assert len(nested) == 1
    assert nested[0].startswith("policy.yaml:2:75: executors[0][0][0]")


def test_some_other_yaml_file_gets_one_clear_error():
    text = "AWSTemplateFormatVersion: '2010-09-09'\nResources:\n  Queue: {Type: 'AWS::SQS::Queue', Name: !Ref N}\n"
    assert errors_of(text, "template.yaml") == [
        "template.yaml:1:1: (document): not a routing policy: none of its top-level keys is version, executors,"
        " defaults, settings or rules (found AWSTemplateFormatVersion, Resources)"
    ]


def test_yaml_problems_inside_an_unknown_key_are_not_reported_twice():
    text = policy_text("- {name: all, run_on: local}\n") + "extras:\n  a: !Ref x\n  b: 2020-13-45\n"
    assert errors_of(text) == ["policy.yaml:11:1: extras: unknown key 'extras' (did you mean 'executors'?)"]


def test_all_errors_are_reported_not_just_the_first():
    text = policy_text(
        """
        - {name: a, if: {queue: x}, run_on: lamda}
        - {name: b, if: {qeue: x}, run_on: local}
        - {name: c, if: {expected_duration: "<5 weeks"}, run_on: local}
        - {name: all, run_on: local}
        """
    )
    assert len(errors_of(text)) == 3


def test_missing_file_is_a_policy_error_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy(missing)
    [issue] = caught.value.issues
    assert str(issue) == f"{missing}:1:1: (document): cannot read the file: No such file or directory"


def test_directory_and_non_utf8_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the file"):
        load_policy(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(latin1)
    assert str(caught.value) == f"{latin1}:2:6: (document): not UTF-8 text: invalid continuation byte"


def test_control_character_position():
    with pytest.raises(PolicyError) as caught:
        load_policy_text("version: 1\nrules: [\x00]\n", "p.yaml")
    assert str(caught.value).startswith("p.yaml:2:9: (document): invalid YAML: unacceptable character #x0000")


def test_warnings_are_kept_on_the_error_too():
    text = policy_text("- {name: q, if: {queue: a}, run_on: lamda}\n- {name: all, run_on: lambda}\n")
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "policy.yaml")
    assert [issue.severity for issue in caught.value.warnings] == ["warning", "warning"]

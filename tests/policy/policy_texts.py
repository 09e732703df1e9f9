"""Policy texts for the policy tests: a valid head to append rules to, and loading or failing to load a text."""

from __future__ import annotations

import textwrap

import pytest

from hybrid_router.router.policy import Policy, PolicyError, load_policy_text

# A valid policy head: tests append a rule list (see policy_text) or change one piece of it.
BASE_POLICY = """\
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    limits: {max_duration: 15m, max_memory_mb: 10240}
  local:
    class: LocalExecutor
defaults: {expected_duration: 5m, memory_mb: 512, run_on: local}
rules:
"""


def policy_text(rules: str) -> str:
    return BASE_POLICY + textwrap.indent(textwrap.dedent(rules).strip("\n"), "  ") + "\n"


def load(text: str, filename: str = "policy.yaml") -> Policy:
    return load_policy_text(textwrap.dedent(text), filename)


def errors_of(text: str, filename: str = "policy.yaml") -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(textwrap.dedent(text), filename)
    return [str(issue) for issue in caught.value.issues]

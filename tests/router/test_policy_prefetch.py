"""The policy's ``executors.<name>.prefetch``: read by the loader, checked by the schema."""

from __future__ import annotations

import pytest

from hybrid_router.router.policy import PolicyError, load_policy_text

POLICY = """\
version: 1
executors:
  local: {class: LocalExecutor, max_concurrency: 4%s}
defaults: {expected_duration: 1m, memory_mb: 512, run_on: local}
rules:
  - {name: all, run_on: local}
"""


@pytest.mark.parametrize(
    ("text", "expected"), [("", None), (", prefetch: null", None), (", prefetch: 0", 0), (", prefetch: 6", 6)]
)
def test_prefetch_is_read_and_left_unset_when_absent(text, expected):
    policy = load_policy_text(POLICY % text, "policy.yaml")
    assert policy.executors["local"].prefetch == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (", prefetch: -1", "policy.yaml:3:63: executors.local.prefetch: must be at least 0, got integer -1"),
        (
            ", prefetch: lots",
            "policy.yaml:3:63: executors.local.prefetch: expected an integer or null, got string 'lots'",
        ),
    ],
)
def test_a_bad_prefetch_names_its_line_and_field(text, message):
    with pytest.raises(PolicyError) as caught:
        load_policy_text(POLICY % text, "policy.yaml")
    assert [str(issue) for issue in caught.value.issues] == [message]


def test_a_changed_prefetch_is_a_change_of_the_executors_section():
    # Policy reload refuses executor changes (they take a restart); prefetch is one of them.
    first = load_policy_text(POLICY % ", prefetch: 1", "policy.yaml")
    second = load_policy_text(POLICY % ", prefetch: 2", "policy.yaml")
    assert dict(first.executors) != dict(second.executors)

from __future__ import annotations

from datetime import timedelta

import pytest

from hybrid_router.router.policy import TaskFacts, resolve_facts


class RecordingHistory:
    def __init__(self, answer: float | None):
        self.answer = answer
        self.calls: list[tuple[str, str]] = []

    def __call__(self, dag_id: str, task_id: str) -> float | None:
        self.calls.append((dag_id, task_id))
        return self.answer


def resolve(**kwargs) -> TaskFacts:
    return resolve_facts(dag_id="d", task_id="t", **kwargs)


def test_executor_config_wins_over_timeout_and_history():
    history = RecordingHistory(1200.0)
    found = resolve(
        executor_config={"hybrid_router": {"expected_duration": "2m", "memory_mb": "3GB"}},
        execution_timeout_s=600,
        history=history,
    )
    assert (found.expected_duration_s, found.duration_source) == (120, "executor_config")
    assert (found.memory_mb, found.memory_source) == (3072, "executor_config")
    assert history.calls == []  # the database is not asked when a better source answered


def test_execution_timeout_wins_over_history():
    history = RecordingHistory(1200.0)
    found = resolve(execution_timeout_s=600, history=history)
    assert (found.expected_duration_s, found.duration_source) == (600, "execution_timeout")
    assert history.calls == []
    assert resolve(execution_timeout_s=timedelta(minutes=3)).expected_duration_s == 180


def test_history_when_nothing_else_is_known():
    history = RecordingHistory(95.5)
    found = resolve(history=history, executor_config={"KubernetesExecutor": {}})
    assert (found.expected_duration_s, found.duration_source) == (95.5, "history")
    assert history.calls == [("d", "t")]


def test_nothing_known_leaves_the_default_to_the_policy():
    found = resolve(history=RecordingHistory(None), queue="q", pool="p", operator="BashOperator")
    assert found == TaskFacts("d", "t", queue="q", pool="p", operator="BashOperator")


def test_memory_accepts_numbers_and_sizes():
    assert resolve(executor_config={"hybrid_router": {"memory_mb": 2048}}).memory_mb == 2048
    assert resolve(executor_config={"hybrid_router": {"memory_mb": "2GiB"}}).memory_mb == 2048
    assert resolve(executor_config={"hybrid_router": {"memory_mb": "512MB"}}).memory_mb == 512


@pytest.mark.parametrize(
    ("executor_config", "message"),
    [
        (
            {"hybrid_router": {"expected_duration": "soon"}},
            r"executor_config\['hybrid_router'\]\['expected_duration'\]",
        ),
        ({"hybrid_router": {"memory_mb": "lots"}}, r"executor_config\['hybrid_router'\]\['memory_mb'\]"),
        ({"hybrid_router": {"memory_mb": -1}}, r"executor_config\['hybrid_router'\]\['memory_mb'\]"),
        ({"hybrid_router": "10m"}, r"executor_config\['hybrid_router'\] must be a dict"),
    ],
)
def test_invalid_executor_config_names_the_field(executor_config, message):
    with pytest.raises(ValueError, match=message):
        resolve(executor_config=executor_config)


def test_invalid_timeout_or_history_value():
    with pytest.raises(ValueError, match="execution_timeout"):
        resolve(execution_timeout_s=-1)
    with pytest.raises(ValueError, match=r"history for d\.t returned"):
        resolve(history=RecordingHistory(float("nan")))

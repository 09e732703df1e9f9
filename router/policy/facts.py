"""What is known about a task before it runs, gathered from the places Airflow keeps it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from .model import (
    SOURCE_EXECUTION_TIMEOUT,
    SOURCE_EXECUTOR_CONFIG,
    SOURCE_HISTORY,
    TaskFacts,
)
from .units import is_plain_number, parse_duration, parse_memory_mb

EXECUTOR_CONFIG_SECTION = "hybrid_router"

HistoryLookup = Callable[[str, str], float | None]


def resolve_facts(
    *,
    dag_id: str,
    task_id: str,
    queue: str | None = None,
    pool: str | None = None,
    operator: str | None = None,
    executor_config: Mapping[str, Any] | None = None,
    execution_timeout_s: float | timedelta | None = None,
    history: HistoryLookup | None = None,
) -> TaskFacts:
    """TaskFacts with the expected duration and memory need taken from the best source known.

    Duration, first known of: ``executor_config["hybrid_router"]["expected_duration"]``, the task's
    execution timeout, ``history(dag_id, task_id)`` (p95 of recent successful runs; only called when the
    first two say nothing), else None (the policy default applies when deciding). Memory:
    ``executor_config["hybrid_router"]["memory_mb"]`` else None. Invalid values raise ValueError naming
    the field.
    """
    section = _router_section(executor_config)
    duration, duration_source = None, None
    if section.get("expected_duration") is not None:
        duration = _from_config(section, "expected_duration", parse_duration)
        duration_source = SOURCE_EXECUTOR_CONFIG
    elif execution_timeout_s is not None:
        duration = _timeout_seconds(execution_timeout_s)
        duration_source = SOURCE_EXECUTION_TIMEOUT
    elif history is not None:
        duration = history(dag_id, task_id)
        if duration is not None:
            if not _is_duration(duration):
                raise ValueError(
                    f"history for {dag_id}.{task_id} returned {duration!r}, not a duration in seconds"
                )
            duration, duration_source = float(duration), SOURCE_HISTORY
    memory, memory_source = None, None
    if section.get("memory_mb") is not None:
        memory = _from_config(section, "memory_mb", parse_memory_mb)
        memory_source = SOURCE_EXECUTOR_CONFIG
    return TaskFacts(
        dag_id=dag_id,
        task_id=task_id,
        queue=queue,
        pool=pool,
        operator=operator,
        expected_duration_s=duration,
        duration_source=duration_source,
        memory_mb=memory,
        memory_source=memory_source,
    )


def _router_section(executor_config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not executor_config:
        return {}
    if not isinstance(executor_config, Mapping):
        raise ValueError(f"executor_config must be a dict, got {type(executor_config).__name__}")
    section = executor_config.get(EXECUTOR_CONFIG_SECTION)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ValueError(
            f"executor_config[{EXECUTOR_CONFIG_SECTION!r}] must be a dict such as "
            f"{{'expected_duration': '10m', 'memory_mb': '2GB'}}, got {type(section).__name__}"
        )
    return section


def _from_config(section: Mapping[str, Any], key: str, parse: Callable[[Any], Any]) -> Any:
    try:
        return parse(section[key])
    except ValueError as error:
        raise ValueError(f"executor_config[{EXECUTOR_CONFIG_SECTION!r}][{key!r}]: {error}") from None


def _timeout_seconds(timeout: float | timedelta) -> float:
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if not _is_duration(seconds):
        raise ValueError(f"execution_timeout must be a duration of 0 seconds or more, got {timeout!r}")
    return float(seconds)


def _is_duration(value: Any) -> bool:
    return is_plain_number(value) and value >= 0

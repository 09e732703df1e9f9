"""What is known about a task before it runs, gathered from the places Airflow keeps it.

Measured memory comes in as ``MemoryEvidence`` from a ``MemoryLookup`` handed to ``resolve_facts``; the policy
turns it into a figure with its own ``settings.memory_headroom`` and ``settings.learn_after_runs``
(``learned_memory_need``), so that one reader serves every policy the router reloads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .model import (
    SOURCE_EXECUTION_TIMEOUT,
    SOURCE_EXECUTOR_CONFIG,
    SOURCE_HISTORY,
    SOURCE_MEASURED,
    SOURCE_OUT_OF_MEMORY,
    TaskFacts,
)
from .units import is_plain_number, parse_duration, parse_memory_mb

EXECUTOR_CONFIG_SECTION = "hybrid_router"

HistoryLookup = Callable[[str, str], float | None]


@dataclass(frozen=True, slots=True)
class OutOfMemory:
    """A run that ran out of memory: the task needs more than ``limit_mb``, however few runs were measured."""

    limit_mb: int  # the memory size the run had: the function's size (its executor's limits.max_memory_mb)
    executor: str  # the policy's name for the executor it ran on
    at: datetime  # when it died; a naive datetime is taken as UTC

    def __post_init__(self) -> None:
        if not (isinstance(self.limit_mb, int) and not isinstance(self.limit_mb, bool) and self.limit_mb > 0):
            raise ValueError(f"OutOfMemory.limit_mb must be an int > 0, got {self.limit_mb!r}")
        if not isinstance(self.at, datetime):
            raise ValueError(f"OutOfMemory.at must be a datetime, got {self.at!r}")


@dataclass(frozen=True, slots=True)
class MemoryEvidence:
    """What a task's measured runs say about its memory need. Hashable: it is part of the decision cache key.

    ``runs`` is how many recent runs had their peak memory measured and ``p95_peak_mb`` the p95 of those peaks
    (None with no run); ``out_of_memory`` is the out-of-memory death on the largest size, if any.
    """

    runs: int = 0
    p95_peak_mb: float | None = None
    out_of_memory: OutOfMemory | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.runs, int) and not isinstance(self.runs, bool) and self.runs >= 0):
            raise ValueError(f"MemoryEvidence.runs must be an int >= 0, got {self.runs!r}")
        peak = self.p95_peak_mb
        if (peak is None) != (self.runs == 0):
            raise ValueError(f"MemoryEvidence.p95_peak_mb must be given exactly when runs > 0, got {peak!r}")
        if peak is not None and not (is_plain_number(peak) and peak >= 0):
            raise ValueError(f"MemoryEvidence.p95_peak_mb must be a finite number >= 0, got {peak!r}")
        if self.out_of_memory is not None and not isinstance(self.out_of_memory, OutOfMemory):
            raise ValueError(
                f"MemoryEvidence.out_of_memory must be an OutOfMemory, got {self.out_of_memory!r}"
            )


# (dag_id, task_id) -> the task's evidence, or None when nothing was measured. Called once per uncached routing
# decision, inside the scheduler loop: it must answer from memory (a cache refreshed in the background or by
# TTL), never with a query of its own.
MemoryLookup = Callable[[str, str], MemoryEvidence | None]


@dataclass(frozen=True, slots=True)
class LearnedMemory:
    """A memory need worked out from measurements, and where it came from."""

    mb: int
    source: str  # SOURCE_MEASURED or SOURCE_OUT_OF_MEMORY
    basis: str  # "1,824 MB: p95 of 14 runs x 1.2", "more than 512 MB: out of memory on lambda at ..."


def learned_memory_need(evidence: MemoryEvidence, *, headroom: float, min_runs: int) -> LearnedMemory | None:
    """The memory need ``evidence`` supports: the p95 of the measured peaks times ``headroom`` once there are
    ``min_runs`` runs, and more than the size of any function the task ran out of memory on; the larger wins.
    None when neither applies (the policy default does).
    """
    found: list[LearnedMemory] = []
    if evidence.p95_peak_mb is not None and evidence.runs >= min_runs:
        # rounded first so that 1000 x 1.1 is 1100, not 1101 for a float's last bit
        need = max(1, math.ceil(round(evidence.p95_peak_mb * headroom, 6)))
        basis = f"{need:,} MB: p95 of {count_runs(evidence.runs)} x {headroom:g}"
        found.append(LearnedMemory(need, SOURCE_MEASURED, basis))
    oom = evidence.out_of_memory
    if oom is not None:
        basis = f"more than {oom.limit_mb:,} MB: out of memory on {oom.executor} at {_utc(oom.at)}"
        found.append(LearnedMemory(oom.limit_mb + 1, SOURCE_OUT_OF_MEMORY, basis))
    # a tie goes to the out-of-memory death: a fact about this size, not an estimate
    return max(found, key=lambda learned: (learned.mb, learned.source == SOURCE_OUT_OF_MEMORY), default=None)


def count_runs(count: int, noun: str = "run") -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _utc(moment: datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


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
    memory: MemoryLookup | None = None,
) -> TaskFacts:
    """TaskFacts with the expected duration and memory need taken from the best source known.

    Duration, first known of: ``executor_config["hybrid_router"]["expected_duration"]``, the task's
    execution timeout, ``history(dag_id, task_id)`` (p95 of recent successful runs; only called when the
    first two say nothing), else None (the policy default applies when deciding). Memory:
    ``executor_config["hybrid_router"]["memory_mb"]``, else ``memory(dag_id, task_id)`` (measured runs, kept
    as ``memory_evidence`` for the policy to turn into a figure), else None. Invalid values raise ValueError
    naming the field.
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
    memory_mb, memory_source, evidence = None, None, None
    if section.get("memory_mb") is not None:
        memory_mb = _from_config(section, "memory_mb", parse_memory_mb)
        memory_source = SOURCE_EXECUTOR_CONFIG
    elif memory is not None:
        evidence = memory(dag_id, task_id)
        if evidence is not None and not isinstance(evidence, MemoryEvidence):
            raise ValueError(
                f"memory lookup for {dag_id}.{task_id} returned {evidence!r}, not a MemoryEvidence or None"
            )
    return TaskFacts(
        dag_id=dag_id,
        task_id=task_id,
        queue=queue,
        pool=pool,
        operator=operator,
        expected_duration_s=duration,
        duration_source=duration_source,
        memory_mb=memory_mb,
        memory_source=memory_source,
        memory_evidence=evidence,
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

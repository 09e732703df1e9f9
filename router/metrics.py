"""Counters the router emits through Airflow's stats backend (StatsD / OpenTelemetry, whichever is configured).

The deprecated ``airflow.stats.Stats`` shim points at the task SDK's copy of the stats module, which the
scheduler never initialises; ``BaseExecutor.__init__`` initialises this one, so executors report through it.
"""

from __future__ import annotations

import re

from airflow._shared.observability.metrics import stats

PREFIX = "hybrid_router"
_NOT_SLUG = re.compile(r"[^a-z0-9_]+")


def slug(text: str) -> str:
    """A metric-safe name: lower case, runs of anything but ``[a-z0-9_]`` become one ``_``.

    StatsD and OpenTelemetry reject or silently rename dots, spaces and colons inside a name segment, so a
    rule called "short and small" is counted as ``hybrid_router.rule.short_and_small``.
    """
    return _NOT_SLUG.sub("_", text.lower()).strip("_") or "unnamed"


def count_routed(executor: str, rule: str) -> None:
    stats.incr(f"{PREFIX}.routed.{slug(executor)}")
    stats.incr(f"{PREFIX}.rule.{slug(rule)}")


def count_overflow(from_executor: str, to_executor: str) -> None:
    stats.incr(f"{PREFIX}.overflow.{slug(from_executor)}.{slug(to_executor)}")


def count_waiting(executor: str) -> None:
    stats.incr(f"{PREFIX}.waiting.{slug(executor)}")


def count_fallback(from_executor: str, to_executor: str, reason: str) -> None:
    stats.incr(f"{PREFIX}.fallback.{slug(from_executor)}.{slug(to_executor)}")
    stats.incr(f"{PREFIX}.fallback_reason.{slug(reason)}")


def count_fallback_exhausted(executor: str) -> None:
    stats.incr(f"{PREFIX}.fallback_exhausted.{slug(executor)}")


def count_child_start_failed(executor: str) -> None:
    stats.incr(f"{PREFIX}.child_start_failed.{slug(executor)}")


def gauge_child(executor: str, *, in_flight: int, free: int, available: bool = True) -> None:
    stats.gauge(f"{PREFIX}.child.{slug(executor)}.in_flight", in_flight)
    stats.gauge(f"{PREFIX}.child.{slug(executor)}.free_slots", free)
    stats.gauge(f"{PREFIX}.child.{slug(executor)}.available", int(available))


def gauge_waiting(total: int) -> None:
    stats.gauge(f"{PREFIX}.waiting_tasks", total)

"""What each finished Lambda run used, kept for the router (``child_protocol.ReportsRunMeasurements``).

The handler puts the figures of Lambda's ``REPORT`` line in every FINISHED result (``protocol.RunUsage``). A run
Lambda killed (out of memory, a crash) sends none: its dead letter says only how it died, so all that is known
of it is the function's memory size, which the executor read from Lambda at start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cachetools import TTLCache

from hybrid_router.child_protocol import RunMeasurement

if TYPE_CHECKING:
    from airflow.models.taskinstancekey import TaskInstanceKey

    from hybrid_router.lambda_exec.protocol import ResultMessage

# Measurements nobody popped (no router) are dropped after this long, or beyond this many.
MEASUREMENT_TTL_S = 3600.0
MAX_MEASUREMENTS = 100_000


class RunMeasurements:
    """The measurement of each task's last finished run, by task key, until popped."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.memory_size_mb: int | None = None  # the function's, once known
        self._kept: TTLCache[TaskInstanceKey, RunMeasurement] = TTLCache(
            maxsize=MAX_MEASUREMENTS, ttl=MEASUREMENT_TTL_S, timer=clock
        )

    def record(self, key: TaskInstanceKey, result: ResultMessage) -> None:
        """Keep what the run behind ``result`` (a FINISHED that decides the task) used, if it says."""
        usage = result.usage
        if usage is None:  # a handler older than run measurements
            return
        self._kept[key] = RunMeasurement(
            memory_size_mb=usage.memory_size_mb,
            peak_memory_mb=usage.peak_memory_mb,
            duration_ms=usage.duration_ms,
            billed_duration_ms=usage.billed_duration_ms,
        )

    def pop(self, key: TaskInstanceKey) -> RunMeasurement | None:
        """What the run of ``key`` that ended last used; a run that sent no figures ran with the function's size."""
        kept = self._kept.pop(key, None)
        if kept is None and self.memory_size_mb is not None:
            return RunMeasurement(memory_size_mb=self.memory_size_mb)
        return kept

"""The optional interface a child executor may offer its router, beyond ``BaseExecutor``.

Duck-typed: the router calls these only when a child has them, and ``lambda_exec`` never imports the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from airflow.models.taskinstancekey import TaskInstanceKey


@dataclass(frozen=True)
class InfrastructureFailure:
    """A run that died for reasons outside the task's own code.

    ``reason`` is one of the infrastructure values of ``hybrid_router.lambda_exec.protocol.Outcome``
    (``timeout``, ``out_of_memory``, ``runtime_crash``, ``dead_lettered``, ``throttled``, ``event_expired``,
    ``unreported``), or
    ``credentials`` / ``invoke_rejected`` for an invoke Lambda refused (the run never started).
    A child reports one only once the failed run can no longer act on the task (it is fenced): the router may
    then hand the same try to another executor.
    """

    reason: str
    detail: str = ""
    executor: str = ""
    # False when the failed run never held the try (it was never invoked, or its copy ended without claiming
    # the task): the try is then QUEUED unless another run of it claimed it, which must keep it.
    held: bool = True


@dataclass(frozen=True)
class RunMeasurement:
    """What one finished run of a task used, as the child that ran it measured it; None where it could not.

    The Lambda executor gives the figures of Lambda's ``REPORT`` line, which its handler reports with each run's
    final result: the function's memory size, the peak memory of the run's sandbox, the duration and the billed
    duration.
    """

    memory_size_mb: int | None = None
    peak_memory_mb: int | None = None
    duration_ms: float | None = None
    billed_duration_ms: int | None = None


@dataclass(frozen=True)
class FunctionLimits:
    """What the child's compute really allows one run, as it learned at start (a Lambda function's memory size
    and timeout); None where it could not find out. The router compares them with the policy's ``limits``."""

    memory_mb: int | None = None
    timeout_s: float | None = None


@runtime_checkable
class CapacityAware(Protocol):
    def free_capacity(self) -> int:
        """How many more tasks this child can start now (0 while it is throttled)."""


@runtime_checkable
class ReportsInfrastructureFailures(Protocol):
    def pop_infrastructure_failure(self, key: TaskInstanceKey) -> InfrastructureFailure | None:
        """The infrastructure failure behind the FAILED event this child emitted for ``key``, if any.

        The child puts a FAILED event in its event buffer as usual and keeps the failure here until it is
        popped (or, with no router, until it ages out), so a standalone executor behaves like any other.
        """


@runtime_checkable
class ReportsRunMeasurements(Protocol):
    def pop_run_measurement(self, key: TaskInstanceKey) -> RunMeasurement | None:
        """What the run behind the final event this child emitted for ``key`` used, if the child measured it.

        Kept until popped (or, with no router, until it ages out), like an infrastructure failure.
        """


@dataclass(frozen=True)
class SharedConcurrency:
    """A limit on runs at once that the child shares with every other scheduler's children (a Lambda function's
    concurrency): the router counts the runs of all schedulers against it (``router/shared_capacity.py``).

    Children with the same ``key`` draw on one pool. ``external_id_patterns`` are SQL ``LIKE`` patterns (escape
    character ``\\``) of the ``external_executor_id`` the child writes for its runs, alone or behind a router's.
    """

    key: str
    limit: int
    external_id_patterns: tuple[str, ...] = ()


# The escape character of ``SharedConcurrency.external_id_patterns``.
LIKE_ESCAPE = "\\"


def like_literal(text: str) -> str:
    """``text`` escaped to match itself in a ``LIKE`` pattern (function and executor names may hold ``_``)."""
    for special in (LIKE_ESCAPE, "%", "_"):
        text = text.replace(special, LIKE_ESCAPE + special)
    return text


@runtime_checkable
class SharesConcurrency(Protocol):
    def shared_concurrency(self) -> SharedConcurrency | None:
        """The limit this child shares with other schedulers, None while it has none (or does not know it yet)."""

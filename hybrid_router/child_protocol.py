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

"""Fake child executors for the router's unit tests: no processes, no database."""

from __future__ import annotations

from typing import Any

from airflow.executors import workloads
from airflow.executors.base_executor import BaseExecutor
from airflow.utils.state import TaskInstanceState

from hybrid_router.child_protocol import InfrastructureFailure


class FakeChild(BaseExecutor):
    """Records what it was asked to run; the test decides what happens to each task."""

    supports_callbacks = False

    def __init__(self, parallelism: int = 4, team_name: str | None = None, label: str = "fake") -> None:
        super().__init__(parallelism=parallelism, team_name=team_name)
        self.label = label
        self.started = self.ended = self.terminated = False
        self.dispatched: list[workloads.ExecuteTask] = []
        self.revoked: list[Any] = []
        self.heartbeats = 0

    def start(self) -> None:
        self.started = True

    def _process_workloads(self, workload_items) -> None:
        for workload in workload_items:
            self.queued_tasks.pop(workload.key)
            self.running.add(workload.key)
            self.dispatched.append(workload)
            self.running_state(workload.key, f"{self.label}-run-{workload.ti.task_id}")

    def heartbeat(self) -> None:
        self.heartbeats += 1
        super().heartbeat()

    def finish(self, key, state=TaskInstanceState.SUCCESS, info=None) -> None:
        self.change_state(key, state, info)

    def revoke_task(self, *, ti) -> None:
        self.revoked.append(ti.key)
        self.running.discard(ti.key)

    def end(self) -> None:
        self.ended = True

    def terminate(self) -> None:
        self.terminated = True


class CapacityChild(FakeChild):
    """A child that offers ``free_capacity()``, like the Lambda executor while throttled."""

    def __init__(self, *args: Any, capacity: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capacity = capacity

    def free_capacity(self) -> int:
        return self.capacity


class DyingChild(FakeChild):
    """A child whose runs die for infrastructure reasons when the test says so, like a Lambda timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._failures: dict[Any, InfrastructureFailure] = {}

    def die(
        self,
        key,
        reason: str = "timeout",
        detail: str = "Task timed out after 3.00 seconds",
        held: bool = True,
    ) -> None:
        self._failures[key] = InfrastructureFailure(reason=reason, detail=detail, held=held)
        self.fail(key)

    def pop_infrastructure_failure(self, key) -> InfrastructureFailure | None:
        return self._failures.pop(key, None)


class QueueingChild(FakeChild):
    """Takes every task into its own queue and never fills ``running``, like LocalExecutor in Airflow 3.3.2."""

    def _process_workloads(self, workload_items) -> None:
        for workload in workload_items:
            self.queued_tasks.pop(workload.key)
            self.dispatched.append(workload)


class UnstartableChild(FakeChild):
    """A child whose ``start()`` fails its first ``failures`` calls, like the Lambda executor's health check
    while its credentials have expired. ``secret`` is in the error's message, as option values can be."""

    def __init__(
        self, *args: Any, failures: int = 1, secret: str = "s3cr3t-option-value", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.failures = failures
        self.secret = secret
        self.start_calls = 0

    def start(self) -> None:
        from botocore.exceptions import ClientError

        self.start_calls += 1
        if self.start_calls <= self.failures:
            raise ClientError(
                {"Error": {"Code": "ExpiredTokenException", "Message": f"token of {self.secret} expired"}},
                "GetFunction",
            )
        super().start()

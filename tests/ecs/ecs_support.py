"""Support for the ECS child tests: the account on moto, task instance rows and a recording child executor.

The recording executor stands in for every non-ECS child of a policy, so a test sees exactly which tasks the
router handed to which child without running anything.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from airflow.executors import workloads
from airflow.executors.base_executor import BaseExecutor
from airflow.models.taskinstancekey import TaskInstanceKey

from devtools.devstack import MotoServer

# Import path of RecordingExecutor as a policy's ``class``: this folder is on sys.path while its tests run.
RECORDING_EXECUTOR = "ecs_support.RecordingExecutor"


@dataclass(frozen=True)
class EcsAccount:
    """What the ECS executor is configured to use on moto."""

    moto: MotoServer
    cluster: str
    task_family: str
    container: str

    def client(self) -> Any:
        return self.moto.client("ecs")


class RecordingExecutor(BaseExecutor):
    """Takes every workload it is given, reports it RUNNING, and never runs it."""

    def __init__(self, parallelism: int = 8, team_name: str | None = None) -> None:
        super().__init__(parallelism=parallelism, team_name=team_name)
        self.started = False
        self.dispatched: list[workloads.ExecuteTask] = []

    def start(self) -> None:
        self.started = True

    def _process_workloads(self, workload_items: Any) -> None:
        for workload in workload_items:
            self.queued_tasks.pop(workload.key)
            self.running.add(workload.key)
            self.dispatched.append(workload)
            self.running_state(workload.key, f"recorded-{workload.ti.task_id}")

    def sync(self) -> None:
        pass

    def end(self) -> None:
        pass

    def terminate(self) -> None:
        pass


@dataclass(eq=False)
class TaskInstanceRow:
    """What adoption reads of a ``TaskInstance`` row (the router's and AwsEcsExecutor's), without a database.

    The ECS executor rebuilds the workload of each task it adopts with ``ExecuteTask.make(ti)``, which reads
    the row's own fields plus its DAG model's bundle and file and its DAG run's bundle version.
    """

    id: uuid.UUID
    dag_id: str
    task_id: str
    run_id: str
    try_number: int
    map_index: int
    dag_version_id: uuid.UUID
    pool_slots: int
    priority_weight: int
    queue: str
    executor_config: dict[str, Any] | None
    external_executor_id: str | None
    dag_model: SimpleNamespace
    dag_run: SimpleNamespace
    state: str = "running"
    hostname: str | None = None
    context_carrier: dict[str, Any] | None = None

    @classmethod
    def of(cls, workload: workloads.ExecuteTask, external_executor_id: str | None) -> TaskInstanceRow:
        ti = workload.ti
        return cls(
            id=ti.id,
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            try_number=ti.try_number,
            map_index=ti.map_index,
            dag_version_id=ti.dag_version_id,
            pool_slots=ti.pool_slots,
            priority_weight=ti.priority_weight,
            queue=ti.queue,
            executor_config=ti.executor_config,
            external_executor_id=external_executor_id,
            dag_model=SimpleNamespace(
                bundle_name=workload.bundle_info.name, relative_fileloc=str(workload.dag_rel_path)
            ),
            dag_run=SimpleNamespace(bundle_version=workload.bundle_info.version),
        )

    @property
    def key(self) -> TaskInstanceKey:
        return TaskInstanceKey(self.dag_id, self.task_id, self.run_id, self.try_number, self.map_index)

"""In-memory Airflow workloads for driving the LambdaExecutor without a scheduler or a database."""

from __future__ import annotations

import uuid

from airflow.executors.workloads import BundleInfo, ExecuteTask
from airflow.executors.workloads.task import TaskInstanceDTO


def make_workload(
    task_id: str = "t1",
    *,
    dag_id: str = "lambda_dag",
    run_id: str = "manual__1",
    try_number: int = 1,
    map_index: int = -1,
    token: str = "",
    dag_rel_path: str = "lambda_dag.py",
    executor_config: dict | None = None,
) -> ExecuteTask:
    ti = TaskInstanceDTO(
        id=uuid.uuid4(),
        dag_id=dag_id,
        task_id=task_id,
        run_id=run_id,
        try_number=try_number,
        map_index=map_index,
        dag_version_id=uuid.uuid4(),
        pool_slots=1,
        priority_weight=1,
        queue="default",
        executor_config=executor_config,
    )
    return ExecuteTask(
        ti=ti,
        dag_rel_path=dag_rel_path,
        token=token,
        log_path=f"dag_id={dag_id}/run_id={run_id}/task_id={task_id}/attempt={try_number}.log",
        bundle_info=BundleInfo(name="dags-folder"),
    )

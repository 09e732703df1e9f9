"""An Airflow ``ExecuteTask`` built in memory, for the tests and the dispatch benchmark (no scheduler, no database)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any


def make_workload(
    task_id: str,
    *,
    dag_id: str = "dag",
    run_id: str = "run",
    try_number: int = 1,
    map_index: int = -1,
    queue: str = "default",
    priority_weight: int = 1,
    executor_config: dict[str, Any] | None = None,
    token: str | None = None,
    dag_rel_path: str | None = None,
    log_path: str | None = None,
) -> Any:
    """An ``ExecuteTask`` as the scheduler would queue it.

    ``token`` defaults to ``token-of-<task_id>`` and ``dag_rel_path`` to ``<dag_id>.py``. ``log_path`` defaults to
    none, so the router writes no task log file; a test that reads that file passes its own path.
    """
    # Airflow on first use, not with this module: importing it reads AIRFLOW_HOME and the configuration.
    from airflow.executors.workloads import BundleInfo, ExecuteTask
    from airflow.executors.workloads.task import TaskInstanceDTO

    ti = TaskInstanceDTO(
        id=uuid.uuid4(),
        dag_id=dag_id,
        task_id=task_id,
        run_id=run_id,
        try_number=try_number,
        map_index=map_index,
        dag_version_id=uuid.uuid4(),
        pool_slots=1,
        priority_weight=priority_weight,
        queue=queue,
        executor_config=executor_config,
    )
    return ExecuteTask(
        ti=ti,
        dag_rel_path=Path(dag_rel_path or f"{dag_id}.py"),
        token=f"token-of-{task_id}" if token is None else token,
        log_path=log_path,
        bundle_info=BundleInfo(name="dags-folder"),
    )

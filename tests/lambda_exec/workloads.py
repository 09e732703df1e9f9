"""In-memory Airflow workloads for driving the LambdaExecutor without a scheduler or a database."""

from __future__ import annotations

from typing import Any

from devtools import devstack


def make_workload(
    task_id: str = "t1",
    *,
    dag_id: str = "lambda_dag",
    run_id: str = "manual__1",
    token: str = "",
    **fields: Any,
) -> Any:
    return devstack.make_workload(task_id, dag_id=dag_id, run_id=run_id, token=token, **fields)

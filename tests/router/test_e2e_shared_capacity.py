"""End to end: two schedulers' routers share one Lambda function's concurrency, and the rest overflows to Local.

PostgreSQL, two ``airflow scheduler`` processes (each with its router: a Lambda child that may run as many tasks as
the whole function, and a LocalExecutor child), the API server, the DAG processor, the local Lambda service and
moto's SQS. Both schedulers queue tasks of one burst; each router alone would put up to the function's limit on
Lambda, so without a shared count the two of them would send twice that, and the excess would wait in Lambda's queue
while Local had room. The test checks the local Lambda service's own counters: never more runs than the limit, and
no event that waited for a concurrency slot.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from devtools.lambda_settings import airflow_with_local_lambda
from hybrid_router.lambda_exec.local.launcher import FunctionConfig
from hybrid_router.router.audit import EVENT_ROUTED

pytestmark = pytest.mark.e2e

SECRET = "e2e-shared-capacity-secret"
FUNCTION = "airflow-task"
DAG_ID = "shared_capacity"
LIMIT = 3  # the function's reserved concurrency
TASKS = 10
LOCAL_PER_ROUTER = 2  # with the function's 3 slots, 7 run at once and 3 wait for a slot in their router
SLEEP_S = 3

DAG = f"""
import time

import pendulum
from airflow.sdk import dag, task


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False)
def {DAG_ID}():
    @task
    def work(i):
        time.sleep({SLEEP_S})

    work.expand(i=list(range({TASKS})))


{DAG_ID}()
"""

# Each router may run the function's whole limit: what it believes with no count across schedulers.
POLICY = f"""
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: {LIMIT}
    limits: {{max_duration: 15m, max_memory_mb: 10240}}
  local: {{class: LocalExecutor, max_concurrency: {LOCAL_PER_ROUTER}, prefetch: 0}}
defaults: {{expected_duration: 1m, memory_mb: 512, run_on: local}}
settings: {{fallback_mode: same_try, max_fallbacks: 1}}
rules:
  - name: lambda first
    run_on: lambda
    overflow: [local]
    fallback: [local]
"""


def test_two_schedulers_never_run_more_than_the_functions_limit_and_overflow_the_rest(
    tmp_path: Path, postgres_url
):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").write_text(textwrap.dedent(DAG))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    function = FunctionConfig(
        name=FUNCTION, memory_mb=512, timeout_s=120, reserved_concurrency=LIMIT, maximum_retry_attempts=0
    )
    started = time.monotonic()
    with airflow_with_local_lambda(
        tmp_path,
        dags,
        executor="hybrid_router.router.RoutingExecutor",
        function=function,
        secret=SECRET,
        # Two tasks per scheduling pass: the burst is queued by both schedulers, not all of it by the first.
        config={"hybrid_router": {"policy_file": policy}, "scheduler": {"max_tis_per_query": 2}},
        database_url=postgres_url,
        schedulers=2,
    ) as stack:
        airflow = stack.airflow
        run_id = airflow.trigger(DAG_ID)
        assert airflow.wait_run(DAG_ID, run_id, timeout=240) == "success", airflow.log_dir
        counts = stack.service.stats()["functions"][FUNCTION]
        tis = airflow.sql(
            "SELECT map_index, state, try_number, queued_by_job_id, external_executor_id FROM task_instance "
            "WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, run_id),
        )
        routed = [
            (map_index, json.loads(extra))
            for map_index, extra in airflow.sql(
                "SELECT map_index, extra FROM log WHERE dag_id = ? AND run_id = ? AND event = ?",
                (DAG_ID, run_id, EVENT_ROUTED),
            )
        ]
    print(f"e2e shared capacity: {time.monotonic() - started:.1f}s; Lambda counters {counts}")

    assert len(tis) == TASKS
    assert {(state, try_number) for _, state, try_number, _, _ in tis} == {("success", 1)}
    jobs = {map_index: job for map_index, _, _, job, _ in tis}
    assert len(set(jobs.values())) == 2, "both schedulers queued tasks of the burst"
    on_lambda = [i for i, _, _, _, ext in tis if ext.startswith(f"lambda@1|lambda:{FUNCTION}:")]
    on_local = [i for i, _, _, _, ext in tis if ext == "local@1"]
    assert len(on_lambda) + len(on_local) == TASKS and on_lambda

    # The function itself: never more runs than its limit, and no event waited in its queue for a slot.
    assert counts["max_in_flight"] <= LIMIT
    assert counts["concurrency_waits"] == 0, counts
    assert counts["async_accepted"] == len(on_lambda)

    # What did not fit on the function went to Local as an overflow, straight from the router.
    overflowed = {map_index for map_index, extra in routed if extra.get("how") == "overflow"}
    assert overflowed == set(on_local) and on_local
    assert all(extra["overflow_from"] == "lambda" for _, extra in routed if extra.get("how") == "overflow")
    per_job = {
        job: (sum(jobs[i] == job for i in on_lambda), sum(jobs[i] == job for i in on_local))
        for job in set(jobs.values())
    }
    print(f"(on Lambda, on Local) per scheduler job: {per_job}")

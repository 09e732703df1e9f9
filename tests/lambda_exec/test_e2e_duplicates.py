"""End to end: AWS's at-least-once delivery through a real scheduler. The local Lambda service delivers every
async event twice (half the copies at once, half once the first run has ended); the execution API lets one run
claim each try (its ``/run``), the other copy is refused (409) and reports ``NOT_CLAIMED``, which is never a
failure. Each try's body runs exactly once and every task succeeds at its first try.

Real Airflow (API server, scheduler, DAG processor on PostgreSQL) with ``LambdaExecutor``, the local Lambda
service running the project's real handler (which runs Airflow's own supervisor and task runner), and moto's SQS.

PostgreSQL, not SQLite: the execution API lets one run claim a try by reading the task instance ``FOR UPDATE``
before it marks it RUNNING, and SQLite ignores ``FOR UPDATE``. Two copies whose ``/run`` calls overlap can both
take the task there (Airflow's race, not the executor's; docs/lambda.md): seen in CI, where the copy bound to the
try was then stopped as "running elsewhere" and the try failed.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from devtools.devstack import wait_until
from devtools.lambda_settings import airflow_with_local_lambda, all_deliveries_ended
from hybrid_router.lambda_exec.local.faults import FaultSettings
from hybrid_router.lambda_exec.local.launcher import FunctionConfig

pytestmark = pytest.mark.e2e

SECRET = "e2e-duplicates-secret"
FUNCTION = "airflow-task"
# Well above a task's few seconds on a loaded two-core machine, cold sandbox included.
FUNCTION_TIMEOUT_S = 30

# Each task appends a start line and an end line: `start|end dag task map_index try lambda_run`.
DAGS = """
import os
import time
import pendulum
from airflow.sdk import dag, get_current_context, task

JOURNAL = %(journal)r


def note(what):
    ti = get_current_context()["ti"]
    run = os.environ.get("HYBRID_ROUTER_RUN_ID", "?")
    with open(JOURNAL, "a") as out:
        out.write(f"{what} {ti.dag_id} {ti.task_id} {ti.map_index} {ti.try_number} {run}\\n")


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, default_args={"retries": 0})
def lambda_warm_up():
    @task
    def warm(i):
        time.sleep(2)  # long enough for the three to run side by side, each warming a sandbox
        return i

    warm.expand(i=[0, 1, 2])


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, default_args={"retries": 0})
def lambda_duplicates():
    @task
    def quick():
        note("start")
        time.sleep(0.5)
        note("end")

    @task
    def mapped(i):
        note("start")
        time.sleep(0.5)
        note("end")
        return i

    for i in range(4):
        quick.override(task_id=f"quick_{i}")()
    mapped.expand(i=[0, 1])


lambda_warm_up()
lambda_duplicates()
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory, postgres_server) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("lambda-e2e-duplicates")
    dags = root / "dags"
    dags.mkdir()
    journal = root / "journal.txt"
    journal.touch()
    (dags / "lambda_duplicates.py").write_text(textwrap.dedent(DAGS % {"journal": str(journal)}))
    function = FunctionConfig(
        name=FUNCTION,
        memory_mb=512,
        timeout_s=FUNCTION_TIMEOUT_S,
        reserved_concurrency=3,  # two cores: more parallel task runners only queue for the CPU
        maximum_retry_attempts=0,
    )
    with airflow_with_local_lambda(
        root,
        dags,
        executor="hybrid_router.lambda_exec.LambdaExecutor",
        function=function,
        secret=SECRET,
        database_url=postgres_server.create_database("lambda_e2e_duplicates"),
    ) as lambda_stack:
        yield SimpleNamespace(
            airflow=lambda_stack.airflow,
            service=lambda_stack.service,
            journal=journal,
            log_dir=lambda_stack.log_dir,
        )


def test_every_event_delivered_twice_runs_each_try_once(stack):
    airflow, service = stack.airflow, stack.service
    # Warm three sandboxes first (Airflow's task runner imported once in each), with faithful delivery.
    warm_run = airflow.trigger("lambda_warm_up")
    assert airflow.wait_run("lambda_warm_up", warm_run, timeout=180) == "success"
    wait_until(
        lambda: all_deliveries_ended(service, FUNCTION), 60, "the warm-up's invocations to end", interval=0.2
    )

    service.set_delivery_faults(
        settings=FaultSettings(duplicate_rate=1.0, duplicate_after_end_share=0.5, seed=1)
    )
    run_id = airflow.trigger("lambda_duplicates")
    assert airflow.wait_run("lambda_duplicates", run_id, timeout=240) == "success"
    # The copies delivered after their first run's end come later: wait until every copy has run.
    wait_until(lambda: all_deliveries_ended(service, FUNCTION), 120, "every duplicate to end", interval=0.2)

    tis = airflow.task_instances("lambda_duplicates", run_id)
    assert len(tis) == 6
    assert {ti["state"] for ti in tis} == {"success"}, tis
    assert {ti["try_number"] for ti in tis} == {1}, tis

    stats = service.stats()
    assert stats["faults"]["duplicates_delivered"] > 0, stats
    assert stats["faults"]["duplicates_delivered"] >= 6, stats  # every event of the run was delivered twice

    # Each try's body completed exactly once, in one Lambda run: one start and one end, same run, in order.
    lines = [line.split() for line in Path(stack.journal).read_text().splitlines() if line.strip()]
    tries = Counter((task, map_index, attempt) for _, _, task, map_index, attempt, _ in lines)
    expected = {(f"quick_{i}", "-1", "1") for i in range(4)} | {("mapped", str(i), "1") for i in range(2)}
    assert set(tries) == expected, lines
    assert set(tries.values()) == {2}, lines
    for key in expected:
        mine = [line for line in lines if tuple(line[2:5]) == key]
        assert [line[0] for line in mine] == ["start", "end"], mine
        assert mine[0][5] == mine[1][5] != "?", mine  # the run that claimed the try ran its body

    # The refused copies said so, and the executor took none of their results as the task's.
    scheduler_log = airflow.process_log("scheduler").read_text(errors="replace")
    # A refused copy that reports after its dispatch ended (it waited for a sandbox) is dropped with the retired
    # dispatch's messages, so the scheduler logs the refusal only for copies that beat the first run's end;
    # the handler logs say every refusal.
    assert "lambda infrastructure failure" not in scheduler_log
    handler_logs = "".join(p.read_text(errors="replace") for p in Path(stack.log_dir).rglob("*.log"))
    assert handler_logs.count(": not_claimed ") >= 1
    # Nothing reached the DLQ path as a failed invocation: no copy failed the invocation.
    assert stats["functions"][FUNCTION].get("handled_error", 0) == 0, stats

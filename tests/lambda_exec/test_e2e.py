"""End to end: a real Airflow (API server, scheduler, DAG processor on SQLite) with
``[core] executor = hybrid_router.lambda_exec.LambdaExecutor``, the local Lambda service running the project's
real handler (which runs Airflow's own task runner), and moto's SQS.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.executor import parse_external_id
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService
from hybrid_router.lambda_exec.protocol import Outcome, Phase, ResultMessage, TaskRef

from hybrid_router.devstack import FAKE_AWS_ENV, AirflowStack, MotoServer, free_port, wait_until

pytestmark = pytest.mark.e2e

SECRET = "e2e-signing-secret"
# Airflow's task runner needs 3-8 s to start and parse the DAG on a loaded 2-core machine, and the restart
# test's steps must still run when the new scheduler adopts them (~12 s after the kill): 5 s leaves no room.
FUNCTION_TIMEOUT_S = 30
OK_TASKS = 20

MAIN_DAG = """
import time
import pendulum
from airflow.sdk import dag, task

@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, default_args={"retries": 0})
def lambda_e2e():
    @task(priority_weight=100)
    def sleeper():
        time.sleep(120)

    @task(priority_weight=100)
    def hog():
        chunks = []
        while True:
            chunks.append(b"x" * (32 * 1024 * 1024))
            time.sleep(0.01)

    @task(priority_weight=50)
    def fails():
        raise RuntimeError("the task's own failure")

    @task
    def ok(i):
        print("ok task", i, "ran on Lambda")
        return i

    sleeper()
    hog()
    fails()
    for i in range(%(ok_tasks)d):
        ok.override(task_id=f"ok_{i}")(i)

lambda_e2e()
"""

RESTART_DAG = """
import time
import pendulum
from airflow.sdk import dag, task

MARKER = %(marker)r

@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, default_args={"retries": 0})
def lambda_restart():
    @task
    def step(i):
        time.sleep(12)  # still running when the restarted scheduler adopts it
        with open(MARKER, "a") as out:
            out.write(f"step_{i}\\n")

    for i in range(6):
        step.override(task_id=f"step_{i}")(i)

lambda_restart()
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("lambda-e2e")
    dags = root / "dags"
    dags.mkdir()
    marker = root / "restart-marker.txt"
    (dags / "lambda_e2e.py").write_text(textwrap.dedent(MAIN_DAG % {"ok_tasks": OK_TASKS}))
    (dags / "lambda_restart.py").write_text(textwrap.dedent(RESTART_DAG % {"marker": str(marker)}))
    lambda_port = free_port()
    log_dir = root / "lambda-logs"
    with MotoServer(log_dir=root) as moto:
        results = moto.create_queue("e2e-results")
        dlq = moto.create_queue("e2e-dlq")
        airflow = AirflowStack(
            home=root / "airflow",
            dags_folder=dags,
            executor="hybrid_router.lambda_exec.LambdaExecutor",
            config={
                "lambda_executor": {
                    "function_name": "airflow-task",
                    "results_queue_url": results,
                    "dead_letter_queue_url": dlq,
                    "signing_secret": SECRET,
                    "region_name": "us-east-1",
                    "lambda_endpoint_url": f"http://127.0.0.1:{lambda_port}",
                    "sqs_endpoint_url": moto.url,
                    "aws_conn_id": "",
                    "local_log_dir": str(log_dir),
                },
                # The task process lingers ~4 s after its final state in the sandbox; Airflow ends it after
                # this overtime (the task's state is already recorded), so runs end well before the timeout.
                "core": {"task_success_overtime": 1},
                # Adopt a dead scheduler's tasks within seconds, not minutes.
                "scheduler": {"scheduler_health_check_threshold": 5, "orphaned_tasks_check_interval": 2},
            },
        )
        function = FunctionConfig(
            name="airflow-task",
            memory_mb=512,
            timeout_s=FUNCTION_TIMEOUT_S,
            reserved_concurrency=3,  # two cores: more parallel task runners only queue for the CPU
            dead_letter_queue_url=dlq,
            maximum_retry_attempts=0,
            environment={"HYBRID_ROUTER_SIGNING_SECRET": SECRET},
        )
        service_env = {**airflow.env, **FAKE_AWS_ENV, "AWS_ENDPOINT_URL_SQS": moto.url}
        with LocalLambdaService(
            functions=[function],
            env=service_env,
            sqs_endpoint_url=moto.url,
            port=lambda_port,
            log_dir=log_dir,
        ) as service:
            try:
                airflow.start()
                yield SimpleNamespace(
                    airflow=airflow, moto=moto, results=results, service=service, marker=marker
                )
            finally:
                airflow.stop()


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _forge_results_for(stack: SimpleNamespace, dag_id: str, run_id: str, task_id: str) -> int:
    """Once the task runs, send results claiming it succeeded: one wrongly signed, one unsigned."""

    def running_external_id():
        rows = stack.airflow.sql(
            "select external_executor_id, state from task_instance where dag_id=? and run_id=? and task_id=?",
            (dag_id, run_id, task_id),
        )
        return rows[0][0] if rows and rows[0][1] == "running" and rows[0][0] else None

    external = wait_until(running_external_id, 60, f"{task_id} to run on Lambda", interval=0.1)
    _, request_id, dispatch_id = parse_external_id(external)
    forged = ResultMessage(
        phase=Phase.FINISHED,
        dispatch_id=dispatch_id,
        task=TaskRef(dag_id, task_id, run_id, 1, -1),
        sent_at=time.time(),
        outcome=Outcome.SUCCESS,
        return_code=0,
        request_id=request_id,
    )
    sqs = stack.moto.client("sqs")
    sqs.send_message(QueueUrl=stack.results, MessageBody=protocol.seal_result(forged, b"not-the-secret"))
    sqs.send_message(QueueUrl=stack.results, MessageBody=protocol.seal(forged.to_payload(), b"x")[:-3] + '"}')
    return 2


def test_lambda_dag_outcomes(stack):
    airflow = stack.airflow
    run_id = airflow.trigger("lambda_e2e")
    _forge_results_for(stack, "lambda_e2e", run_id, "sleeper")
    assert airflow.wait_run("lambda_e2e", run_id, timeout=150) == "failed"
    tis = {ti["task_id"]: ti for ti in airflow.task_instances("lambda_e2e", run_id)}
    assert {tis[f"ok_{i}"]["state"] for i in range(OK_TASKS)} == {"success"}
    assert {tis[name]["state"] for name in ("fails", "sleeper", "hog")} == {"failed"}
    assert all(ti["try_number"] == 1 for ti in tis.values())
    assert "ran on Lambda" in airflow.task_log("lambda_e2e", run_id, "ok_3")

    scheduler_log = airflow.process_log("scheduler").read_text(errors="replace")
    infra = [line for line in scheduler_log.splitlines() if "lambda infrastructure failure" in line]
    assert any("task_id='sleeper'" in line and "failure: timeout" in line for line in infra), infra
    assert any("task_id='hog'" in line and "failure: out_of_memory" in line for line in infra), infra
    assert not any(
        "task_id='fails'" in line for line in infra
    )  # the task's own failure is not infrastructure
    # The forged results were dropped with a log line and did not make the sleeper succeed.
    assert scheduler_log.count("that changes no task") >= 2
    assert SECRET not in scheduler_log

    # The timeout is reported within 3 s of the function's timeout.
    sleeper = tis["sleeper"]
    assert _seconds(sleeper["start_date"], sleeper["end_date"]) < FUNCTION_TIMEOUT_S + 3
    # Infrastructure failures are in the audit log (written by the executor itself, see _save_task_event_logs).
    events = {row[0] for row in airflow.sql("select event from log where dag_id='lambda_e2e'")}
    assert {"lambda timeout", "lambda out_of_memory"} <= events, events


def test_killed_scheduler_loses_no_task_and_runs_none_twice(stack):
    airflow = stack.airflow
    run_id = airflow.trigger("lambda_restart")

    def some_running():
        rows = airflow.sql(
            "select count(*) from task_instance where dag_id='lambda_restart' and run_id=? and state='running'",
            (run_id,),
        )
        return rows[0][0] > 0

    wait_until(some_running, 60, "a step to run", interval=0.1)
    airflow.kill_scheduler()
    time.sleep(3)
    airflow.start_scheduler()
    assert airflow.wait_run("lambda_restart", run_id, timeout=150) == "success"
    tis = {ti["task_id"]: ti for ti in airflow.task_instances("lambda_restart", run_id)}
    assert {ti["state"] for ti in tis.values()} == {"success"}
    # Each step ran exactly once, whichever scheduler saw it finish.
    runs = Path(stack.marker).read_text().split()
    assert sorted(runs) == sorted(f"step_{i}" for i in range(6)), runs
    # The steps running on Lambda during the restart were adopted by the new scheduler and kept their try;
    # steps still waiting in the dead executor (never invoked) were reset by Airflow and ran once, later.
    scheduler_log = airflow.process_log("scheduler").read_text(errors="replace")
    adopted_lines = [line for line in scheduler_log.splitlines() if "Adopted TaskInstanceKey" in line]
    assert adopted_lines, "no task was adopted"
    for line in adopted_lines:
        task_id = line.split("task_id='")[1].split("'")[0]
        assert tis[task_id]["try_number"] == 1, (task_id, tis[task_id])

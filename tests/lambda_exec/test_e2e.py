"""End to end: a real Airflow (API server, scheduler, DAG processor on SQLite) with
``[core] executor = hybrid_router.lambda_exec.LambdaExecutor``, the local Lambda service running the project's
real handler (which runs Airflow's own task runner), and moto's SQS.

Two functions: ``airflow-task`` (30 s) runs most tasks; ``airflow-task-5s`` (the issue's 5 s timeout) runs the
task that sleeps past its timeout, through a second LambdaExecutor instance (an aliased entry of Airflow's
executor list with its own results queue) that the task names with ``executor=``.
"""

from __future__ import annotations

import os
import re
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from devtools.devstack import FAKE_AWS_ENV, AirflowStack, MotoServer, free_port, wait_until
from devtools.lambda_settings import local_lambda_settings
from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.external_id import parse_lambda_external_id
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService
from hybrid_router.lambda_exec.protocol import Outcome, Phase, ResultMessage, TaskRef

pytestmark = pytest.mark.e2e

SECRET = "e2e-signing-secret"
# The restart test's steps must still run when the new scheduler adopts them (~12 s after the kill).
FUNCTION_TIMEOUT_S = 30
SHORT_FUNCTION = "airflow-task-5s"
SHORT_TIMEOUT_S = 5
OK_TASKS = 20
# A run sends STARTED again this often and stops itself after three without one: a sandbox that stops without a
# word (the `frozen` task) is declared dead about 15 s after it stopped, half the function's timeout.
RUN_HEARTBEAT_S = 3

# Importable by every Airflow process (PYTHONPATH): the second executor instance, bound to the 5 s function.
# Its own results queue: on a shared one, each instance first releases the other's results (a visibility
# timeout each), which would delay the timeout report past what the test checks.
SHORT_EXECUTOR_MODULE = """
from hybrid_router.lambda_exec import LambdaExecutor


class ShortLambdaExecutor(LambdaExecutor):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("function_name", %(function)r)
        kwargs.setdefault("results_queue_url", %(results)r)
        super().__init__(*args, **kwargs)
"""

MAIN_DAG = """
import time
import pendulum
from airflow.sdk import dag, task

@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, default_args={"retries": 0})
def lambda_e2e():
    # The first run in the 5 s function's sandbox imports Airflow's task runner (seconds on a loaded machine);
    # this one warms it, so that the sleeper really runs, and sleeps past the timeout.
    @task(priority_weight=100, executor="short")
    def warm_up():
        return "warm"

    @task(priority_weight=100, executor="short", trigger_rule="all_done")
    def sleeper():
        time.sleep(120)

    @task(priority_weight=100)
    def forge_target():
        time.sleep(8)  # running long enough for forged results to arrive
        raise RuntimeError("the task's own failure, whatever forged results say")

    @task(priority_weight=100)
    def hog():
        chunks = []
        while True:
            chunks.append(b"x" * (32 * 1024 * 1024))
            time.sleep(0.01)

    @task(priority_weight=50)
    def fails():
        raise RuntimeError("the task's own failure")

    # After `fails`, in a sandbox that imported Airflow's task runner already: a cold one can spend half the
    # function's timeout on that import under load, leaving the heartbeat too little time to beat the timeout.
    @task(priority_weight=100, trigger_rule="all_done")
    def frozen():
        import os, signal, psutil
        time.sleep(1)
        # The whole sandbox stops without a word, as one the host lost: the handler (its heartbeats with it),
        # Airflow's supervisor (its heartbeats to the API) and this task. Nothing reaches the DLQ before the
        # function's timeout kills it.
        supervisor = psutil.Process(os.getppid())
        for pid in (supervisor.ppid(), supervisor.pid, os.getpid()):
            os.kill(pid, signal.SIGSTOP)

    @task
    def ok(i):
        print("ok task", i, "ran on Lambda")
        return i

    warm_up() >> sleeper()
    forge_target()
    hog()
    fails() >> frozen()
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


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(tmp_path_factory, request) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("lambda-e2e")
    database_url = None
    if request.param == "postgres":
        database_url = request.getfixturevalue("postgres_server").create_database(f"lambda_e2e_{os.getpid()}")
    dags = root / "dags"
    dags.mkdir()
    marker = root / "restart-marker.txt"
    (dags / "lambda_e2e.py").write_text(textwrap.dedent(MAIN_DAG % {"ok_tasks": OK_TASKS}))
    (dags / "lambda_restart.py").write_text(textwrap.dedent(RESTART_DAG % {"marker": str(marker)}))
    modules = root / "modules"
    modules.mkdir()
    lambda_port = free_port()
    log_dir = root / "lambda-logs"
    with MotoServer(log_dir=root) as moto:
        results = moto.create_queue("e2e-results")
        dlq = moto.create_queue("e2e-dlq")
        short_results = moto.create_queue("e2e-results-5s")
        (modules / "e2e_short_executor.py").write_text(
            SHORT_EXECUTOR_MODULE % {"function": SHORT_FUNCTION, "results": short_results}
        )
        airflow = AirflowStack(
            home=root / "airflow",
            dags_folder=dags,
            executor="hybrid_router.lambda_exec.LambdaExecutor,short:e2e_short_executor.ShortLambdaExecutor",
            env={"PYTHONPATH": str(modules)},
            database_url=database_url,
            config={
                "lambda_executor": {"run_heartbeat_seconds": RUN_HEARTBEAT_S}
                | local_lambda_settings(
                    function_name="airflow-task",
                    results_queue_url=results,
                    dead_letter_queue_url=dlq,
                    signing_secret=SECRET,
                    lambda_endpoint_url=f"http://127.0.0.1:{lambda_port}",
                    sqs_endpoint_url=moto.url,
                    local_log_dir=log_dir,
                ),
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
        )
        short_function = function.replace(
            name=SHORT_FUNCTION, timeout_s=SHORT_TIMEOUT_S, reserved_concurrency=1
        )
        service_env = {**airflow.env, **FAKE_AWS_ENV, "AWS_ENDPOINT_URL_SQS": moto.url}
        with LocalLambdaService(
            functions=[function, short_function],
            env=service_env,
            sqs_endpoint_url=moto.url,
            port=lambda_port,
            log_dir=log_dir,
        ) as service:
            try:
                airflow.start()
                yield SimpleNamespace(
                    airflow=airflow,
                    moto=moto,
                    results=results,
                    service=service,
                    marker=marker,
                    log_dir=log_dir,
                )
            finally:
                airflow.stop()


def _handler_start(log_dir: Path, function: str, task_label: str) -> datetime:
    """When the handler began the invocation that ran ``task_label``: its "Running ..." line in the log."""
    pattern = re.compile(r"\[INFO\]\t(\S+)Z\t\S+\tRunning " + re.escape(task_label) + " run=")
    for stream in sorted((log_dir / function).glob("*.log")):
        for line in stream.read_text(errors="replace").splitlines():
            found = pattern.match(line)
            if found:
                return datetime.fromisoformat(found.group(1) + "+00:00")
    raise AssertionError(f"no invocation of {task_label} in the logs of {function}")


def _forge_results_for(stack: SimpleNamespace, dag_id: str, run_id: str, task_id: str) -> int:
    """Once the task runs, send results claiming it succeeded: one wrongly signed, one unsigned."""

    def running_external_id():
        rows = stack.airflow.sql(
            "select external_executor_id, state from task_instance where dag_id=? and run_id=? and task_id=?",
            (dag_id, run_id, task_id),
        )
        return rows[0][0] if rows and rows[0][1] == "running" and rows[0][0] else None

    external = wait_until(running_external_id, 60, f"{task_id} to run on Lambda", interval=0.1)
    parsed = parse_lambda_external_id(external)
    request_id, dispatch_id = parsed.request_id, parsed.dispatch_id
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
    _forge_results_for(stack, "lambda_e2e", run_id, "forge_target")
    assert airflow.wait_run("lambda_e2e", run_id, timeout=150) == "failed"
    tis = {ti["task_id"]: ti for ti in airflow.task_instances("lambda_e2e", run_id)}
    assert {tis[f"ok_{i}"]["state"] for i in range(OK_TASKS)} == {"success"}
    assert {tis[name]["state"] for name in ("fails", "forge_target", "sleeper", "hog", "frozen")} == {
        "failed"
    }
    assert all(ti["try_number"] == 1 for ti in tis.values())
    assert "ran on Lambda" in airflow.task_log("lambda_e2e", run_id, "ok_3")

    scheduler_log = airflow.process_log("scheduler").read_text(errors="replace")
    infra = [line for line in scheduler_log.splitlines() if "lambda infrastructure failure" in line]
    assert any("task_id='sleeper'" in line and "failure: timeout" in line for line in infra), infra
    assert any("task_id='hog'" in line and "failure: out_of_memory" in line for line in infra), infra
    # The frozen sandbox: its heartbeat stopped while results were read, well before the function's timeout
    # (which would have given a dead letter, `timeout`).
    assert any(
        "task_id='frozen'" in line and "failure: runtime_crash" in line and "no heartbeat" in line
        for line in infra
    ), infra
    frozen_start = _handler_start(stack.log_dir, "airflow-task", "lambda_e2e.frozen")
    frozen_end = datetime.fromisoformat(tis["frozen"]["end_date"])
    assert (frozen_end - frozen_start).total_seconds() < FUNCTION_TIMEOUT_S - 5, (frozen_start, frozen_end)
    # The task's own failure is not infrastructure.
    assert not any("task_id='fails'" in line or "task_id='forge_target'" in line for line in infra), infra
    # The forged results were dropped with a log line and did not make their task succeed.
    assert scheduler_log.count("that changes no task") >= 2
    assert SECRET not in scheduler_log

    # The task that sleeps past the 5 s function timeout is reported as an infrastructure timeout (by the
    # handler's deadline watch) within 3 s of that timeout, counted from the invocation's start.
    sleeper = tis["sleeper"]
    assert sleeper["executor"] == "short"
    assert sleeper["start_date"], "the sleeper never started in the 5 s function"
    invoked = _handler_start(stack.log_dir, SHORT_FUNCTION, "lambda_e2e.sleeper")
    recorded = datetime.fromisoformat(sleeper["end_date"])
    assert (recorded - invoked).total_seconds() < SHORT_TIMEOUT_S + 3, (invoked, recorded)
    assert any("task_id='sleeper'" in line and "by the handler" in line for line in infra), infra
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

"""End to end: two copies of one event in two Lambda sandboxes that look alike to the execution API.

Airflow's ``/run`` lets a task instance that is already RUNNING be started again by a request carrying the
hostname, unixname and pid it recorded ("the same process asking again"), and its heartbeat checks only
hostname and pid. Lambda sandboxes of one function run the same process tree as the same user, and their
hostnames are not unique, so two copies of one event (AWS delivers async events at least once) can present the
same identity: unless each run names itself, the second copy is let in and the try's body runs twice.

A real API server, scheduler and DAG processor (SQLite); the scheduler's executor only hands over its
workloads (``holding_executor``), and the test runs the very workload it made through the project's handler in
two sandboxes, the second started while the first's task runs. Both sandboxes are processes of this machine
(same hostname and user); the pid their task processes present is pinned to one value, as identical process
trees would give it. The task's body waits for the test's word, so the second copy meets a RUNNING task
whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest

from devtools.devstack import AirflowStack, wait_until
from hybrid_router.lambda_exec.handler import handle
from hybrid_router.lambda_exec.protocol import InvokeEvent, Outcome, Phase, TaskRef

from .handler_support import FakeContext, make_sandbox, results, sealed

if TYPE_CHECKING:
    from moto_sqs import Moto

pytestmark = pytest.mark.e2e

HERE = Path(__file__).resolve().parent
# What identical process trees give the task process of every sandbox.
PINNED_PID = 4242

DAGS = """
import os
import time
import pendulum
from airflow.sdk import dag, task

JOURNAL = %(journal)r
RELEASE = %(release)r


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False, default_args={"retries": 0})
def same_host_pid():
    @task
    def body():
        run = os.environ.get("HYBRID_ROUTER_RUN_ID", "?")
        with open(JOURNAL, "a") as out:
            out.write(f"start {run}\\n")
        deadline = time.monotonic() + 120
        while not os.path.exists(RELEASE) and time.monotonic() < deadline:
            time.sleep(0.1)
        with open(JOURNAL, "a") as out:
            out.write(f"end {run}\\n")

    body()


same_host_pid()
"""

# The handler's own command for a workload run as a new process (``python -m
# hybrid_router.lambda_exec.claim``), with the pid the execution API sees pinned: `/run` and every heartbeat
# carry PINNED_PID.
PINNED_PID_COMMAND = f"""
from airflow.sdk.api.client import TaskInstanceOperations

start, heartbeat = TaskInstanceOperations.start, TaskInstanceOperations.heartbeat
TaskInstanceOperations.start = lambda self, id, pid, when: start(self, id, {PINNED_PID}, when)
TaskInstanceOperations.heartbeat = lambda self, id, pid: heartbeat(self, id, {PINNED_PID})

from hybrid_router.lambda_exec import claim

claim.main()
"""


def pinned_pid_command(path: str) -> list[str]:
    return [sys.executable, "-c", PINNED_PID_COMMAND, "--json-path", path]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("same-host-pid")
    dags, held = root / "dags", root / "held"
    dags.mkdir()
    held.mkdir()
    journal, release = root / "journal.txt", root / "release"
    journal.touch()
    (dags / "same_host_pid.py").write_text(
        textwrap.dedent(DAGS % {"journal": str(journal), "release": str(release)})
    )
    python_path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))
    with AirflowStack(
        home=root / "airflow",
        dags_folder=dags,
        executor="holding_executor.HoldingExecutor",
        env={"PYTHONPATH": python_path, "HOLDING_EXECUTOR_DIR": str(held)},
    ) as airflow:
        yield SimpleNamespace(airflow=airflow, held=held, journal=journal, release=release)


def held_workload(held: Path, timeout: float = 120) -> dict[str, Any]:
    path = wait_until(lambda: next(held.glob("*.json"), None), timeout, "the scheduler to queue the task")
    return json.loads(path.read_text())


def journal_lines(journal: Path) -> list[list[str]]:
    return [line.split() for line in journal.read_text().splitlines() if line.strip()]


def test_two_copies_with_the_same_host_and_pid_run_the_try_once(
    stack: SimpleNamespace, results_queue: str, moto_server: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    airflow: AirflowStack = stack.airflow
    # The sandboxes' task processes talk to this stack's execution API and read its DAG folder.
    for name, value in airflow.env.items():
        if name.startswith("AIRFLOW"):
            monkeypatch.setenv(name, value)

    run_id = airflow.trigger("same_host_pid")
    workload = held_workload(stack.held)
    ti = workload["ti"]
    now = time.time()
    event = sealed(
        InvokeEvent(
            dispatch_id=uuid.uuid4().hex,
            task=TaskRef(ti["dag_id"], ti["task_id"], ti["run_id"], ti["try_number"], ti["map_index"]),
            workload=json.dumps(workload),
            results_queue_url=results_queue,
            issued_at=now,
            not_after=now + 600,
        )
    )
    answers: dict[str, dict[str, Any]] = {}

    def deliver(name: str) -> threading.Thread:
        sandbox = make_sandbox(workload_command=pinned_pid_command)

        def run() -> None:
            answers[name] = handle(event, FakeContext(300), sandbox)

        thread = threading.Thread(target=run, name=f"sandbox-{name}", daemon=True)
        thread.start()
        return thread

    first = deliver("first")
    try:
        # The first copy's task body runs: its /run took the task, which is RUNNING under its identity.
        wait_until(lambda: journal_lines(stack.journal), 120, "the first copy's task to start", interval=0.1)
        (running,) = airflow.task_instances("same_host_pid", run_id)
        assert (running["state"], running["pid"]) == ("running", PINNED_PID), running

        second = deliver("second")
        # The second copy is refused at once, or (let in) starts the body a second time.
        wait_until(
            lambda: not second.is_alive() or len(journal_lines(stack.journal)) > 1,
            120,
            "the second copy to be refused or to start the task",
            interval=0.1,
        )
    finally:
        stack.release.touch()
    first.join(120)
    second.join(120)
    assert not first.is_alive() and not second.is_alive()

    lines = journal_lines(stack.journal)
    starts = [run for what, run in lines if what == "start"]
    assert len(starts) == 1, f"the try's body ran {len(starts)} times: {lines}"
    assert answers["second"]["status"] == Outcome.NOT_CLAIMED.value, answers
    assert answers["first"]["status"] == Outcome.SUCCESS.value, answers
    assert [what for what, _ in lines] == ["start", "end"] and {run for _, run in lines} == set(starts)

    finals = {r.run_id: r for r in results(moto_server, results_queue, 3) if r.phase is Phase.FINISHED}
    assert len(finals) == 2, finals
    (claimed,) = [r for r in finals.values() if r.claimed]
    assert claimed.run_id == starts[0] and claimed.outcome is Outcome.SUCCESS
    (refused,) = [r for r in finals.values() if not r.claimed]
    assert refused.outcome is Outcome.NOT_CLAIMED

    # The task instance records the run that ran it: its hostname names that run, its pid is the shared one.
    assert airflow.wait_run("same_host_pid", run_id, timeout=120) == "success"
    (done,) = airflow.task_instances("same_host_pid", run_id)
    assert (done["state"], done["pid"]) == ("success", PINNED_PID), done
    assert claimed.run_id in done["hostname"] and refused.run_id not in done["hostname"], done

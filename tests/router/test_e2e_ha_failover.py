"""End to end: a scheduler lost mid-flight (``kill -9``) while its router has tasks running on Lambda, running on
Local and waiting for room; the other scheduler adopts them through Airflow's orphan adoption.

PostgreSQL, two ``airflow scheduler`` processes (each with its router, a Lambda child and a LocalExecutor child),
the API server, the DAG processor, the local Lambda service and moto's SQS. Every task body appends a start and an
end line to a journal (``devtools/run_journal.py``) and holds until the test releases it, so the killed
scheduler's tasks are still where they were when the survivor adopts them:

- on Lambda: adopted by the survivor's Lambda child; the run goes on, its result reaches the survivor, the try and
  the run are the ones of before the kill;
- waiting in the dead router: queued again in the survivor's router (not reset) and run once, in the same try;
- on the dead scheduler's LocalExecutor: the exception. Airflow's LocalExecutor cannot adopt them either; the
  survivor resets them and they run again as a new try. The test counts them and checks they are exactly the
  tasks running on Local under the dead scheduler.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from devtools.devstack import AirflowStack, wait_until
from devtools.lambda_settings import airflow_with_local_lambda
from devtools.postgres import set_database_options
from devtools.run_journal import JOURNAL_DAG_HELPERS, check_journal, read_journal
from hybrid_router.lambda_exec.external_id import parse_lambda_external_id
from hybrid_router.lambda_exec.local.launcher import FunctionConfig
from hybrid_router.router.external_id import parse_external_id

pytestmark = pytest.mark.e2e

SECRET = "e2e-ha-failover-secret"
DAG_ID = "ha_failover"
LAMBDA_TASKS, LOCAL_TASKS = 8, 4
# Each router runs two tasks on Lambda and one on Local, and holds three more (the scheduler queues up to the
# children's limits again): whichever six tasks each scheduler takes, one at least has tasks in all three places.
LAMBDA_PER_ROUTER, LOCAL_PER_ROUTER = 2, 1
HEALTH_THRESHOLD_S, ORPHAN_CHECK_S = 10, 5
# A held body never outlives this, nor the function's timeout: a failing test still ends.
HOLD_MAX_S = 150

DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

RELEASE = %(release)r


def held_body():
    # Holds until the test releases it: a killed scheduler's tasks are still there when the survivor adopts them.
    note("start")
    deadline = time.time() + %(hold_max_s)d
    time.sleep(1)
    while time.time() < deadline and not os.path.exists(RELEASE):
        time.sleep(0.2)
    note("end")


# A retry is allowed, so a spent one shows as try 2 instead of a failure.
@dag(
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1),
    catchup=False,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=1)},
)
def ha_failover():
    @task(queue="lambda")
    def on_lambda(i):
        held_body()

    @task
    def on_local(i):
        held_body()

    on_lambda.expand(i=list(range(%(lambda_tasks)d)))
    on_local.expand(i=list(range(%(local_tasks)d)))


ha_failover()
"""

POLICY = f"""
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: {LAMBDA_PER_ROUTER}
    prefetch: 0  # as docs/production.md advises with several schedulers: waiting tasks stay in the router
    limits: {{max_duration: 15m, max_memory_mb: 10240}}
  local: {{class: LocalExecutor, max_concurrency: {LOCAL_PER_ROUTER}, prefetch: 0}}
defaults: {{expected_duration: 1m, memory_mb: 512, run_on: local}}
settings: {{fallback_mode: same_try, max_fallbacks: 1}}
rules:
  # No overflow: a Lambda task waits in its router for room on Lambda.
  - name: lambda queue
    if: {{queue: lambda}}
    run_on: lambda
    fallback: [local]
  - name: everything else
    run_on: local
"""


@pytest.fixture
def ha_stack(tmp_path: Path, postgres_url: str) -> Iterator[SimpleNamespace]:
    dags = tmp_path / "dags"
    dags.mkdir()
    journal, release = tmp_path / "journal.txt", tmp_path / "release"
    journal.touch()
    source = JOURNAL_DAG_HELPERS % {"journal": str(journal)} + DAG % {
        "release": str(release),
        "hold_max_s": HOLD_MAX_S,
        "lambda_tasks": LAMBDA_TASKS,
        "local_tasks": LOCAL_TASKS,
    }
    (dags / "ha_failover.py").write_text(textwrap.dedent(source))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    # A scheduler killed inside a transaction keeps it open (its orphaned LocalExecutor workers hold the
    # connection), and with it its row locks: the server must end such sessions (docs/production.md).
    set_database_options(postgres_url, idle_in_transaction_session_timeout=f"{2 * HEALTH_THRESHOLD_S}s")
    function = FunctionConfig(
        name="airflow-task",
        memory_mb=512,
        timeout_s=HOLD_MAX_S + 60,
        # Both routers' Lambda limits together: no event waits in Lambda's queue.
        reserved_concurrency=2 * LAMBDA_PER_ROUTER,
        maximum_retry_attempts=0,
    )
    with airflow_with_local_lambda(
        tmp_path,
        dags,
        executor="hybrid_router.router.RoutingExecutor",
        function=function,
        secret=SECRET,
        config={
            "hybrid_router": {"policy_file": policy},
            "scheduler": {
                "scheduler_health_check_threshold": HEALTH_THRESHOLD_S,
                "orphaned_tasks_check_interval": ORPHAN_CHECK_S,
            },
        },
        database_url=postgres_url,
        schedulers=2,
    ) as lambda_stack:
        yield SimpleNamespace(airflow=lambda_stack.airflow, journal=journal, release=release)


def place(state: str, external_id: str | None) -> str:
    """Where a task of a live scheduler is: ``lambda`` / ``local`` (its run claimed it, and on Lambda the
    executor has heard so), ``waiting`` in the router, or ``other`` (between two of those)."""
    parsed = parse_external_id(external_id)
    if parsed is None or parsed.try_number != 1:
        return "other"
    run = parse_lambda_external_id(parsed.child_info)
    if state == "running" and parsed.child == "lambda" and run and run.run_id:
        return "lambda"
    if state == "running" and parsed.child == "local":
        return "local"
    if state == "queued" and parsed.child is None:
        return "waiting"
    return "other"


def rows(stack: AirflowStack, run_id: str) -> list[tuple]:
    return stack.sql(
        "SELECT task_id, map_index, state, external_executor_id, queued_by_job_id, try_number "
        "FROM task_instance WHERE dag_id = ? AND run_id = ?",
        (DAG_ID, run_id),
    )


def a_scheduler_with_tasks_everywhere(stack: AirflowStack, run_id: str) -> tuple[int, dict] | None:
    """A scheduler job whose tasks are all settled, some on Lambda, some on Local, some waiting in its router."""
    jobs: dict[int, dict[str, dict]] = {}
    for task_id, map_index, state, external_id, job, _ in rows(stack, run_id):
        if job is not None:
            places = jobs.setdefault(job, {"lambda": {}, "local": {}, "waiting": {}, "other": {}})
            places[place(state, external_id)][(task_id, map_index)] = external_id
    for job, places in sorted(jobs.items()):
        if places["lambda"] and places["local"] and places["waiting"] and not places["other"]:
            return job, places
    return None


def scheduler_of_job(stack: AirflowStack, job_id: int) -> str:
    """The scheduler process that runs ``job_id`` (it names its job when it queues tasks)."""
    mark = f"scheduler job_id={job_id})"
    (name,) = [n for n in stack.scheduler_names if mark in stack.process_log(n).read_text(errors="replace")]
    return name


def received_events(log_text: str, state: str) -> set[tuple[str, int]]:
    """``(task_id, map_index)`` of every ``state`` event a scheduler took from its executor for this DAG."""
    pattern = (
        rf"Received executor event with state {state} for task instance TaskInstanceKey\("
        rf"dag_id='{DAG_ID}', task_id='(\w+)', run_id='[^']*', try_number=1, map_index=(\d+)\)"
    )
    return {(task_id, int(index)) for task_id, index in re.findall(pattern, log_text)}


def test_a_scheduler_killed_mid_flight_loses_nothing_runs_nothing_twice_and_spends_no_retry(ha_stack):
    stack, journal = ha_stack.airflow, ha_stack.journal
    run_id = stack.trigger(DAG_ID)
    victim, at_kill = wait_until(
        lambda: a_scheduler_with_tasks_everywhere(stack, run_id),
        180,
        "a scheduler with tasks running on Lambda, running on Local and waiting in its router",
        interval=0.5,
    )
    victim_name = scheduler_of_job(stack, victim)
    (survivor_name,) = [name for name in stack.scheduler_names if name != victim_name]
    survivor_log_at = stack.process_log(survivor_name).stat().st_size
    stack.kill_scheduler(name=victim_name)

    def adopted() -> bool:
        (state,) = stack.sql("SELECT state FROM job WHERE id = ?", (victim,))[0]
        held = stack.sql(
            "SELECT count(*) FROM task_instance WHERE queued_by_job_id = ? AND state IN ('queued', 'running')",
            (victim,),
        )
        return state == "failed" and held == [(0,)]

    wait_until(
        adopted, 3 * (HEALTH_THRESHOLD_S + ORPHAN_CHECK_S), "the survivor to adopt the dead one's tasks"
    )
    ha_stack.release.touch()
    assert stack.wait_run(DAG_ID, run_id, timeout=180) == "success", stack.log_dir

    final = {
        (task, index): (state, ext, job, tries) for task, index, state, ext, job, tries in rows(stack, run_id)
    }
    expected = set(final)
    assert len(expected) == LAMBDA_TASKS + LOCAL_TASKS
    assert {state for state, *_ in final.values()} == {"success"}

    # The exception: the tries reset by the survivor are exactly those running on the dead scheduler's Local.
    reset = stack.sql(
        "SELECT task_id, map_index, try_number, external_executor_id, queued_by_job_id "
        "FROM task_instance_history WHERE dag_id = ? AND run_id = ?",
        (DAG_ID, run_id),
    )
    local_exception = {(task, index) for task, index, *_ in reset}
    assert local_exception == set(at_kill["local"]), (reset, at_kill)
    assert {(tries, ext, job) for _, _, tries, ext, job in reset} == {(1, "local@1", victim)}
    assert {final[task][3] for task in local_exception} == {2}

    # Everything else: one completed body, in its first try.
    others = expected - local_exception
    assert {final[task][3] for task in others} == {1}, final
    lines = read_journal(journal)
    report = check_journal(
        [line for line in lines if line.task[1:] not in local_exception], {(DAG_ID, *task) for task in others}
    )
    assert report.clean and report.stopped_runs == 0 and not report.retried, (report, lines)
    assert set(report.completed.values()) == {1}, report
    # The exception's first try ran on Local (a pid, not a Lambda run), its second try completed once.
    for task in local_exception:
        mine = [line for line in lines if line.task[1:] == task]
        first_try = {line.run for line in mine if line.try_number == 1}
        assert len(first_try) == 1 and first_try.pop().startswith("pid"), mine
        assert [line.what for line in mine if line.try_number == 2] == ["start", "end"], mine

    # On Lambda at the kill: the same run did the work and its result reached the survivor.
    survivor_log = stack.process_log(survivor_name).read_text(errors="replace")
    assert set(at_kill["lambda"]) <= received_events(survivor_log[survivor_log_at:], "success")
    runs = {line.task[1:]: line.run for line in lines if line.what == "end" and line.try_number == 1}
    for task, at_kill_id in at_kill["lambda"].items():
        assert final[task][1] == at_kill_id, (task, at_kill_id, final[task])
        assert runs[task] == parse_lambda_external_id(parse_external_id(at_kill_id).child_info).run_id

    # Waiting in the dead router: queued again by the survivor's router, which handed each to a child.
    for task in at_kill["waiting"]:
        assert final[task][2] != victim and parse_external_id(final[task][1]).child is not None, final[task]
    adopted = len(at_kill["lambda"]) + len(at_kill["waiting"])
    tail = survivor_log[survivor_log_at:]
    assert f"Adopted {adopted} of {adopted + len(at_kill['local'])} task instances" in tail, tail[-5000:]
    assert f"{len(at_kill['waiting'])} tries a dead scheduler's router held wait in this one again" in tail

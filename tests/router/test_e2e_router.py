"""The RoutingExecutor as ``[core] executor`` of a real Airflow: routing, overflow, fallback, next try, restart."""

from __future__ import annotations

import json
import os
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from devtools.devstack import AirflowStack, wait_until
from hybrid_router.router.external_id import split_child_id

pytestmark = pytest.mark.e2e

ROUTER = "hybrid_router.router.RoutingExecutor"
HERE = Path(__file__).parent

DAG_HEADER = """
import pathlib
import time
from datetime import datetime, timezone

import pendulum
from airflow.sdk import dag, task

MARKERS = pathlib.Path({markers!r})


def ran(name):
    # One line per run of the task body that got to its end: counts how often a task really ran.
    with open(MARKERS / name, "a") as fh:
        fh.write("ran\\n")
"""


def write_dag(folder: Path, markers: Path, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    markers.mkdir(parents=True, exist_ok=True)
    source = DAG_HEADER.format(markers=str(markers)) + textwrap.dedent(body)
    (folder / "dag.py").write_text(source)


def make_stack(
    tmp_path: Path,
    policy: str,
    body: str,
    executor: str = ROUTER,
    database_url: str | None = None,
    **extra_config,
) -> tuple[AirflowStack, Path]:
    dags, markers = tmp_path / "dags", tmp_path / "markers"
    write_dag(dags, markers, body)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(textwrap.dedent(policy))
    config = {"hybrid_router": {"policy_file": policy_file, "reload_interval": 5}, **extra_config}
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    stack = AirflowStack(
        tmp_path / "airflow", dags, executor=executor, config=config, env=env, database_url=database_url
    )
    return stack, markers


def runs_of(markers: Path, name: str) -> int:
    path = markers / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def audit(stack: AirflowStack, dag_id: str) -> list[tuple[str, str, dict]]:
    rows = stack.sql(
        "SELECT event, task_id, extra FROM log WHERE dag_id = ? AND event LIKE 'hybrid_router.%' ORDER BY id",
        (dag_id,),
    )
    return [(event, task_id, json.loads(extra)) for event, task_id, extra in rows]


def by_task(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, dict]:
    return {ti["task_id"]: ti for ti in stack.task_instances(dag_id, run_id)}


def external_ids(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, str]:
    rows = stack.sql(
        "SELECT task_id, external_executor_id FROM task_instance WHERE dag_id = ? AND run_id = ?",
        (dag_id, run_id),
    )
    return dict(rows)


TWO_LOCALS = """
version: 1
executors:
  local_a: {{class: LocalExecutor, max_concurrency: {a}, prefetch: {prefetch}}}
  local_b: {{class: LocalExecutor, max_concurrency: {b}, prefetch: {prefetch}}}
defaults: {{expected_duration: 1m, memory_mb: 512, run_on: local_a}}
rules:
  - name: queue b
    if: {{queue: b}}
    run_on: local_b
    overflow: {b_overflow}
  - name: everything else
    run_on: local_a
"""


def test_tasks_run_where_the_policy_says_and_overflow_when_full(tmp_path, database_url):
    # The router as one aliased entry of Airflow's executor list, beside a plain LocalExecutor (the default).
    stack, markers = make_stack(
        tmp_path,
        # Default prefetch: overflow to a free slot still wins over waiting in local_b's own queue.
        TWO_LOCALS.format(a=4, b=1, b_overflow="[local_a]", prefetch="null"),
        """
        @dag(
            schedule=None,
            start_date=pendulum.datetime(2024, 1, 1),
            catchup=False,
            default_args={"executor": "router"},
        )
        def routing():
            @task(execution_timeout=pendulum.duration(minutes=3))
            def plain():
                ran("plain")

            @task(executor="LocalExecutor")
            def not_routed():
                ran("not_routed")

            @task(queue="b", executor_config={"hybrid_router": {"expected_duration": "10s"}})
            def on_b(i):
                time.sleep(4)
                ran(f"on_b_{i}")

            plain()
            not_routed()
            for i in range(3):
                on_b.override(task_id=f"on_b_{i}")(i)

        routing()
        """,
        executor=f"LocalExecutor,router:{ROUTER}",
        database_url=database_url,
    )
    on_b_tasks = [f"on_b_{i}" for i in range(3)]
    with stack:
        run_id = stack.trigger("routing")
        assert stack.wait_run("routing", run_id, timeout=120) == "success"
        tis = by_task(stack, "routing", run_id)
        assert {t: ti["state"] for t, ti in tis.items()} == dict.fromkeys(tis, "success")
        ids = external_ids(stack, "routing", run_id)
        assert ids["plain"] == "local_a@1"  # the child and the try it ran
        assert ids["not_routed"] is None  # Airflow's own LocalExecutor ran it; the router never saw it
        on_b = [split_child_id(ids[t])[0] for t in on_b_tasks]
        # local_b takes one at a time; the queue-b tasks that found it full ran on local_a instead of waiting.
        assert on_b.count("local_b") >= 1 and on_b.count("local_a") >= 1, on_b
        rows = audit(stack, "routing")
        routed = {task_id: extra for event, task_id, extra in rows if event == "hybrid_router.routed"}
        assert set(routed) == {"plain", *on_b_tasks}
        assert all(routed[t]["executor"] == split_child_id(ids[t])[0] for t in routed)
        overflowed = [t for t, extra in routed.items() if extra["how"] == "overflow"]
        assert overflowed and all(routed[t]["overflow_from"] == "local_b" for t in overflowed)
        assert routed["on_b_0"]["rule"] == "queue b" and routed["plain"]["rule"] == "everything else"
        assert routed["on_b_0"]["duration_source"] == "executor_config"
        # Read from the serialized DAG: the scheduler's task instance does not carry the task.
        assert routed["plain"]["duration_source"] == "execution_timeout"
        assert routed["plain"]["expected_duration_s"] == 180
        log = stack.task_log("routing", run_id, "plain")
        assert "hybrid_router: routed to executor 'local_a' by rule 'everything else'" in log
        assert all(runs_of(markers, name) == 1 for name in ("plain", "not_routed", *on_b_tasks))


DYING = """
version: 1
executors:
  flaky: {class: router_e2e_children.DyingLocalExecutor, max_concurrency: 4}
  local: {class: LocalExecutor, max_concurrency: 4}
defaults: {expected_duration: 1m, memory_mb: 512, run_on: local}
settings: {fallback_mode: %s, max_fallbacks: 1}
rules:
  - name: flaky first
    if: {dag_id: "fallback*"}
    run_on: flaky
    fallback: [local]
"""

FALLBACK_DAG = """
@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False)
def {dag_id}():
    @task(retries={retries}, retry_delay=pendulum.duration(seconds=0))
    def slow_dies():
        time.sleep(4)
        ran("slow_dies")

    @task
    def quick():
        ran("quick")

    slow_dies()
    quick()

{dag_id}()
"""


def test_infrastructure_failure_runs_the_same_try_on_the_fallback(tmp_path):
    stack, markers = make_stack(
        tmp_path, DYING % "same_try", FALLBACK_DAG.format(dag_id="fallback_same", retries=0)
    )
    with stack:
        run_id = stack.trigger("fallback_same")
        assert stack.wait_run("fallback_same", run_id, timeout=120) == "success"
        tis = by_task(stack, "fallback_same", run_id)
        assert tis["slow_dies"]["state"] == "success"
        # The same try, no retry spent: try 1, and no earlier try in the history table.
        assert tis["slow_dies"]["try_number"] == 1
        assert stack.sql("SELECT count(*) FROM task_instance_history WHERE dag_id = 'fallback_same'") == [
            (0,)
        ]
        ids = external_ids(stack, "fallback_same", run_id)
        assert ids == {"slow_dies": "local@1", "quick": ids["quick"]} and ids["quick"].startswith("flaky@1")
        events = [
            (event, task_id, extra.get("executor")) for event, task_id, extra in audit(stack, "fallback_same")
        ]
        assert ("hybrid_router.routed", "slow_dies", "flaky") in events
        assert ("hybrid_router.fallback", "slow_dies", "local") in events
        fallback = next(
            extra for event, _, extra in audit(stack, "fallback_same") if event.endswith("fallback")
        )
        assert fallback["failed_on"] == "flaky" and fallback["reason"] == "runtime_crash"
        log = stack.task_log("fallback_same", run_id, "slow_dies", try_number=1)
        assert "FALLBACK - the run on executor 'flaky' died (runtime_crash" in log
        # The killed run never finished its body; the fallback run did, once.
        assert runs_of(markers, "slow_dies") == 1 and runs_of(markers, "quick") == 1
        # The scheduler's live figures for the Routing page: its row, written on the router's heartbeat.
        ((scheduler, published_at, state),) = stack.sql(
            "SELECT scheduler, published_at, state FROM hybrid_router_live_state"
        )
        age = datetime.now(timezone.utc) - datetime.fromisoformat(published_at).replace(tzinfo=timezone.utc)
        assert scheduler.startswith("job-") and age.total_seconds() < 30
        executors = [(e["name"], e["class"]) for e in json.loads(state)["executors"]]
        assert executors == [("flaky", "DyingLocalExecutor"), ("local", "LocalExecutor")]


def test_next_try_mode_fails_the_try_and_runs_the_retry_on_the_fallback(tmp_path):
    stack, markers = make_stack(
        tmp_path, DYING % "next_try", FALLBACK_DAG.format(dag_id="fallback_next", retries=1)
    )
    with stack:
        run_id = stack.trigger("fallback_next")
        assert stack.wait_run("fallback_next", run_id, timeout=150) == "success"
        tis = by_task(stack, "fallback_next", run_id)
        assert tis["slow_dies"]["state"] == "success" and tis["slow_dies"]["try_number"] == 2
        assert external_ids(stack, "fallback_next", run_id)["slow_dies"] == "local@2"
        events = [(event, task_id) for event, task_id, _ in audit(stack, "fallback_next")]
        assert ("hybrid_router.next_try_fallback", "slow_dies") in events
        # The API answers 404 for the log of a try that moved to the history table: read the file.
        (first_try_log,) = stack.task_log_dir.glob("dag_id=fallback_next/*/task_id=slow_dies/attempt=1.log")
        assert "runs on executor 'local'" in first_try_log.read_text()
        assert "previous try died on 'flaky'" in stack.task_log(
            "fallback_next", run_id, "slow_dies", try_number=2
        )
        assert runs_of(markers, "slow_dies") == 1


def test_scheduler_killed_with_tasks_in_flight_on_two_children_loses_none_and_runs_none_twice(
    tmp_path, database_url
):
    stack, markers = make_stack(
        tmp_path,
        # One slot per child, no overflow, no prefetch: one task runs on each child, one waits in the router for
        # it. (A task prefetched into a LocalExecutor's queue when the scheduler dies is in its orphaned
        # workers' hands, as with a bare LocalExecutor's backlog; this test is about the router's own queue.)
        TWO_LOCALS.format(a=1, b=1, b_overflow="[]", prefetch=0),
        """
        @dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False)
        def restart():
            @task
            def on_a(i):
                time.sleep(5)
                ran(f"on_a_{i}")

            @task(queue="b")
            def on_b(i):
                time.sleep(5)
                ran(f"on_b_{i}")

            for i in range(2):
                on_a.override(task_id=f"on_a_{i}")(i)
                on_b.override(task_id=f"on_b_{i}")(i)

        restart()
        """,
        database_url=database_url,
        scheduler={"scheduler_health_check_threshold": 3, "orphaned_tasks_check_interval": 2},
    )
    names = [f"on_{c}_{i}" for c in "ab" for i in range(2)]
    with stack:
        run_id = stack.trigger("restart")

        def one_running_per_child() -> bool:
            ids = external_ids(stack, "restart", run_id)
            states = {ti["task_id"]: ti["state"] for ti in stack.task_instances("restart", run_id)}
            running = {split_child_id(ids[t])[0] for t, s in states.items() if s == "running"}
            return running == {"local_a", "local_b"}

        wait_until(one_running_per_child, 90, "a task running on each child")
        # Each child has one task running and one waiting in the router (max_concurrency 1 each). The kill may land
        # inside a transaction that locks the DAG run: the orphaned workers must not keep it open, or the next
        # scheduler never examines the run again (router/forked_connections.py).
        stack.kill_scheduler()
        # The running tasks finish on their orphaned workers (they report to the API server, not the
        # scheduler) while no scheduler is up.
        time.sleep(7)
        stack.start_scheduler()
        assert stack.wait_run("restart", run_id, timeout=150) == "success"
        states = {t: ti["state"] for t, ti in by_task(stack, "restart", run_id).items()}
        assert states == dict.fromkeys(names, "success")
        assert {name: runs_of(markers, name) for name in names} == dict.fromkeys(names, 1)

"""The router learns a task's memory need through a real scheduler: two Lambda functions of the local Lambda
service, a small one and a bigger one, with ``run_on: [lambda, lambda_3g]``.

A task that needs more memory than the small function has runs out of memory there and finishes on the bigger
one in the same try; the next run of its DAG goes to the bigger function directly, and ``explain`` says why.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.devstack import AirflowStack, wait_until
from devtools.lambda_settings import LambdaStack, airflow_with_local_lambda
from hybrid_router.router.external_id import split_child_id

pytestmark = pytest.mark.e2e

DAG_ID = "learns_memory"
TASK_ID = "hog"
SMALL_MB, BIG_MB = 512, 3008
SMALL_FUNCTION, BIG_FUNCTION = "airflow-task", "airflow-task-3g"

# A task's handler, supervisor and task runner take about 285 MB in a sandbox: 400 MB more does not fit 512 MB.
# The task holds its memory for a moment, as the local service samples the sandbox's memory every 0.1 s.
DAGS = """
import time

import pendulum
from airflow.sdk import dag, task


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False)
def learns_memory():
    @task
    def hog() -> int:
        block = bytearray(400 * 1024 * 1024)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        time.sleep(1.5)
        return len(block)

    hog()


learns_memory()
"""

# No memory_mb in the task's executor_config: the policy default (256 MB) fits `lambda` until the router
# learns better.
POLICY = f"""
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: 1
    limits: {{max_duration: 15m, max_memory_mb: {SMALL_MB}}}
    options: {{function_name: {SMALL_FUNCTION}}}
  lambda_3g:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: 1
    limits: {{max_duration: 15m, max_memory_mb: {BIG_MB}}}
    options: {{function_name: {BIG_FUNCTION}}}
  local: {{class: LocalExecutor, max_concurrency: 1}}
defaults: {{expected_duration: 1m, memory_mb: 256, run_on: local}}
settings: {{fallback_mode: same_try, max_fallbacks: 1}}
rules:
  - name: smallest lambda that fits
    run_on: [lambda, lambda_3g]
    fallback: {{out_of_memory: [lambda_3g, local], default: [local]}}
"""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LambdaStack]:
    from hybrid_router.lambda_exec.local.launcher import FunctionConfig

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "learns_memory.py").write_text(textwrap.dedent(DAGS))
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    # A cold sandbox imports Airflow's task runner (4-9 s on a loaded 2-core machine): 60 s is plenty.
    small = FunctionConfig(
        name=SMALL_FUNCTION,
        memory_mb=SMALL_MB,
        timeout_s=60,
        reserved_concurrency=1,
        maximum_retry_attempts=0,
    )
    big = small.replace(name=BIG_FUNCTION, memory_mb=BIG_MB)
    with airflow_with_local_lambda(
        tmp_path,
        dags,
        executor="hybrid_router.router.RoutingExecutor",
        function=small,
        more_functions=[big],
        secret="learning-e2e-secret",
        # [hybrid_router] history_cache_ttl keeps its default (5 minutes), longer than the test: the next run is
        # routed by the death the router saw, not by a new read of the database.
        config={"hybrid_router": {"policy_file": policy}},
    ) as lambda_stack:
        yield lambda_stack


def audit(stack: AirflowStack, run_id: str) -> list[tuple[str, int, dict[str, Any]]]:
    """The router's rows of one DAG run, oldest first: (event, try_number, extra)."""
    rows = stack.sql(
        "SELECT event, try_number, extra FROM log WHERE owner = 'hybrid_router' AND dag_id = ? AND run_id = ? "
        "ORDER BY id",
        (DAG_ID, run_id),
    )
    return [(event, try_number, json.loads(extra)) for event, try_number, extra in rows]


def run_once(stack: AirflowStack) -> tuple[str, dict[str, Any]]:
    run_id = stack.trigger(DAG_ID)
    assert stack.wait_run(DAG_ID, run_id, timeout=150) == "success", stack.log_dir
    (ti,) = stack.task_instances(DAG_ID, run_id)
    (external_id,) = stack.sql(
        "SELECT external_executor_id FROM task_instance WHERE dag_id = ? AND run_id = ?", (DAG_ID, run_id)
    )[0]
    return run_id, {**ti, "external_executor_id": external_id}


def finished_runs(stack: AirflowStack, run_id: str, count: int) -> list[dict[str, Any]]:
    """The run's ``run_finished`` rows, once there are ``count``: the router writes the last one when it hears
    the task finished, a moment after the DAG run is over."""

    def rows() -> list[dict[str, Any]]:
        return [extra for event, _, extra in audit(stack, run_id) if event == "hybrid_router.run_finished"]

    wait_until(lambda: len(rows()) >= count, 30, f"{count} run_finished row(s) of {run_id}")
    return rows()


def test_a_task_that_ran_out_of_memory_finishes_on_the_bigger_function_and_goes_there_next_time(stack):
    airflow = stack.airflow

    # First run: out of memory on `lambda`, the same try (no retry spent) finishes on `lambda_3g`.
    first_run, ti = run_once(airflow)
    assert (ti["state"], ti["try_number"]) == ("success", 1)
    assert airflow.sql("SELECT try_number FROM task_instance_history WHERE dag_id = ?", (DAG_ID,)) == []
    child, lambda_id = split_child_id(ti["external_executor_id"])
    assert child == "lambda_3g" and lambda_id.startswith(f"lambda:{BIG_FUNCTION}:"), ti
    routing = [
        (event, extra)
        for event, _, extra in audit(airflow, first_run)
        if event != "hybrid_router.run_finished"
    ]
    assert [(event, extra["executor"], extra["how"]) for event, extra in routing] == [
        ("hybrid_router.routed", "lambda", "policy"),
        ("hybrid_router.fallback", "lambda_3g", "fallback"),
    ]
    assert (routing[1][1]["failed_on"], routing[1][1]["reason"]) == ("lambda", "out_of_memory")
    died, finished = finished_runs(airflow, first_run, 2)
    assert (died["executor"], died["outcome"], died["memory_size_mb"]) == (
        "lambda",
        "out_of_memory",
        SMALL_MB,
    )
    assert (finished["executor"], finished["outcome"], finished["memory_size_mb"]) == (
        "lambda_3g",
        "success",
        BIG_MB,
    )
    assert finished["peak_mb"] > SMALL_MB  # it did need more than the small function has

    # Second run: the router learned the need from the death, and sends the task to `lambda_3g` directly.
    second_run, ti = run_once(airflow)
    assert (ti["state"], ti["try_number"]) == ("success", 1)
    assert split_child_id(ti["external_executor_id"])[0] == "lambda_3g", ti
    rows = audit(airflow, second_run)
    routing = [(event, extra) for event, _, extra in rows if event != "hybrid_router.run_finished"]
    assert [(event, extra["executor"], extra["how"]) for event, extra in routing] == [
        ("hybrid_router.routed", "lambda_3g", "policy")
    ]
    routed = routing[0][1]
    assert (routed["memory_mb"], routed["memory_source"]) == (SMALL_MB + 1, "out_of_memory")
    assert routed["memory_basis"].startswith(f"more than {SMALL_MB} MB: out of memory on lambda at ")
    (only,) = finished_runs(airflow, second_run, 1)
    assert (only["executor"], only["outcome"]) == ("lambda_3g", "success")
    counts = stack.service.stats()["functions"]
    assert counts[SMALL_FUNCTION].get("out_of_memory") == 1  # the first run's death only
    assert counts[BIG_FUNCTION].get("out_of_memory", 0) == 0

    # `explain`, as a user runs it against the same metadata database and policy, says where the figure is from.
    explained = airflow.cli("hybrid-router", "explain", "--dag-id", DAG_ID, "--task-id", TASK_ID)
    assert explained.returncode == 0, explained.stderr
    lines = explained.stdout.splitlines()
    assert lines[0] == f"{DAG_ID}.{TASK_ID} -> lambda_3g", explained.stdout
    (memory_line,) = [line.strip() for line in lines if line.strip().startswith("memory:")]
    assert memory_line.startswith(f"memory:     more than {SMALL_MB} MB: out of memory on lambda at "), (
        memory_line
    )
    assert "passes over lambda: " in explained.stdout

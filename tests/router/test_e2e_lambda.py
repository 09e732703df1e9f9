"""The router with a real Lambda child (local Lambda service, moto's SQS): a Lambda timeout falls back to Local.

The first scenario is the fallback-latency benchmark's (``benchmarks/fallback_latency.py``), run small; the
second stops a BashOperator at the deadline of a short function and checks its on_kill ran and the same try
then ran on the fallback.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark as load_benchmark_script

from devtools.devstack import AirflowStack, wait_until
from devtools.lambda_settings import airflow_with_local_lambda
from hybrid_router.lambda_exec.external_id import parse_lambda_external_id
from hybrid_router.router.external_id import split_child_id

pytestmark = pytest.mark.e2e


def load_benchmark():
    return load_benchmark_script("fallback_latency")


def test_a_lambda_timeout_runs_the_same_try_on_the_local_fallback(tmp_path):
    benchmark = load_benchmark()
    # Room for all four at once on Lambda, so none overflows to local before its Lambda run, and a timeout long
    # enough for four cold sandboxes to start Airflow's task runner on a loaded 2-core machine (4-9 s) and run a
    # quick task (1-2 s). The stack has built its execution API before the run starts (AirflowStack.start):
    # built by the tasks' first /run calls, it took another 3.5-9 s, and the quick tasks hit the deadline.
    with benchmark.run_scenario(tmp_path, slow=2, quick=2, function_timeout_s=15, concurrency=4) as scenario:
        assert scenario.state == "success", scenario.stack.log_dir
        tis = scenario.task_instances()
        assert {t: ti["state"] for t, ti in tis.items()} == dict.fromkeys(tis, "success")
        assert {ti["try_number"] for ti in tis.values()} == {1}  # no retry was spent
        ids = scenario.external_ids()
        assert ids["too_slow_0"] == ids["too_slow_1"] == "local@1"
        assert ids["quick_0"].startswith("lambda@1|lambda:airflow-task:")
        fallbacks = {
            task_id: extra for event, task_id, extra in scenario.audit() if event == "hybrid_router.fallback"
        }
        assert set(fallbacks) == {"too_slow_0", "too_slow_1"}
        assert {extra["reason"] for extra in fallbacks.values()} == {"timeout"}
        assert {extra["failed_on"] for extra in fallbacks.values()} == {"lambda"}
        log = scenario.stack.task_log(benchmark.DAG_ID, scenario.run_id, "too_slow_0")
        assert "FALLBACK - the run on executor 'lambda' died (timeout" in log
        assert "too_slow 0 finished on the fallback executor" in log
        latencies = scenario.latencies()
        assert set(latencies) == {"too_slow_0", "too_slow_1"}
        # Fenced: the Lambda run left no sign of life after the fallback run started.
        assert min(latencies.values()) > 0, latencies
        # Generous for a loaded 2-core machine; the benchmark reports the real figures.
        assert max(latencies.values()) < 10, latencies
        assert_runs_left_what_they_used(scenario, tmp_path / "lambda-logs")


def assert_runs_left_what_they_used(scenario, lambda_logs: Path) -> None:
    """One row per run in Airflow's log table: a Lambda run's with the figures its handler's final result
    carried, which are those of the REPORT line the local Lambda service wrote for it; a local run's with its
    duration."""

    def run_rows() -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        for event, task_id, extra in scenario.audit():
            if event == "hybrid_router.run_finished":
                found.setdefault(task_id, []).append(extra)
        return found

    # The DAG run is over once the tasks said so; the router writes its rows when it hears of it, a moment later.
    wait_until(lambda: len(run_rows().get("too_slow_0", [])) == 2, 30, "the rows of too_slow_0's two runs")
    runs = run_rows()
    (quick,) = runs["quick_0"]
    assert (quick["executor"], quick["outcome"], quick["memory_size_mb"]) == ("lambda", "success", 512)
    # Airflow's task runner and supervisor, forked from the handler: well over 100 MB, counted once.
    assert 100 < quick["peak_mb"] <= 512 and quick["billed_ms"] >= quick["duration_ms"] > 0
    on_lambda, on_local = runs["too_slow_0"]
    assert (on_lambda["executor"], on_lambda["outcome"], on_lambda["memory_size_mb"]) == (
        "lambda",
        "timeout",
        512,
    )
    assert on_lambda["billed_ms"] > 0 and on_lambda["peak_mb"] > 0  # the handler stopped it and reported
    assert (on_local["executor"], on_local["outcome"], on_local["peak_mb"]) == ("local", "success", None)
    assert on_local["duration_ms"] >= 0  # from the task instance's start and end
    request_id = parse_lambda_external_id(split_child_id(scenario.external_ids()["quick_0"])[1]).request_id
    streams = "".join(path.read_text(errors="replace") for path in lambda_logs.glob("airflow-task/*.log"))
    (report,) = [
        line for line in streams.splitlines() if line.startswith(f"REPORT RequestId: {request_id}\t")
    ]
    figures = {name: value.split()[0] for name, value in (f.split(": ", 1) for f in report.split("\t")[1:])}
    assert figures["Memory Size"] == "512"
    assert int(figures["Billed Duration"]) >= quick["billed_ms"]
    # The same measure of the same process tree, sampled by two watchers at their own moments.
    assert abs(int(figures["Max Memory Used"]) - quick["peak_mb"]) <= 0.25 * quick["peak_mb"]


ON_KILL_SECRET = "on-kill-e2e-secret"
# A short function: a warm sandbox starts the BashOperator's command within about a second even on a loaded
# 2-core machine, and the handler stops it 2 s before the deadline, i.e. 3 s into the run. The 2 s margin gives
# on_kill a 1 s grace (half the margin, at most 1 s).
ON_KILL_FUNCTION_TIMEOUT_S = 5
ON_KILL_MARGIN_S = 2

ON_KILL_DAGS = """
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import dag, task

MARKS = {marks!r}
# In Lambda the command outlives the function; BashOperator's on_kill sends SIGTERM to its process group, which
# the trap records (a SIGKILL, the handler's last resort, cannot be trapped). On the fallback it just succeeds.
COMMAND = (
    'if [ -n "$AWS_LAMBDA_FUNCTION_NAME" ]; then '
    + "trap 'echo on_kill try={{{{ ti.try_number }}}} >> " + MARKS + "/on_kill' TERM; "
    + "echo start >> " + MARKS + "/started; "
    + "echo start && sleep 30; "
    + 'else echo "ran on the fallback"; fi'
)


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False)
def lambda_warm_up():
    @task
    def warm_up():
        return "warm"

    warm_up()


# A retry (1 s later) would show as try 2: the fallback must run try 1 again instead.
@dag(
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1),
    catchup=False,
    default_args={{"retries": 1, "retry_delay": timedelta(seconds=1)}},
)
def lambda_on_kill():
    BashOperator(task_id="bash_on_kill", bash_command=COMMAND)


lambda_warm_up()
lambda_on_kill()
"""

ON_KILL_POLICY = """
version: 1
executors:
  lambda:
    class: hybrid_router.lambda_exec.LambdaExecutor
    max_concurrency: 1
    limits: {max_duration: 15m, max_memory_mb: 10240}
  local: {class: LocalExecutor, max_concurrency: 2}
defaults: {expected_duration: 1m, memory_mb: 512, run_on: local}
settings: {fallback_mode: same_try, max_fallbacks: 1}
rules:
  - name: lambda first
    run_on: lambda
    fallback: [local]
"""


@pytest.fixture
def on_kill_stack(tmp_path: Path) -> Iterator[tuple[AirflowStack, Path, Path]]:
    """Airflow with the router; one Lambda function (one sandbox: reserved concurrency 1) and Local as fallback."""
    from hybrid_router.lambda_exec.local.launcher import FunctionConfig

    dags, marks = tmp_path / "dags", tmp_path / "marks"
    dags.mkdir()
    marks.mkdir()
    (dags / "lambda_on_kill.py").write_text(textwrap.dedent(ON_KILL_DAGS.format(marks=str(marks))))
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(ON_KILL_POLICY))
    function = FunctionConfig(
        name="airflow-task",
        memory_mb=512,
        timeout_s=ON_KILL_FUNCTION_TIMEOUT_S,
        reserved_concurrency=1,
        maximum_retry_attempts=0,
        environment={"HYBRID_ROUTER_DEADLINE_MARGIN_S": str(ON_KILL_MARGIN_S)},
    )
    with airflow_with_local_lambda(
        tmp_path,
        dags,
        executor="hybrid_router.router.RoutingExecutor",
        function=function,
        secret=ON_KILL_SECRET,
        config={"hybrid_router": {"policy_file": policy}},
    ) as lambda_stack:
        yield lambda_stack.airflow, marks, lambda_stack.log_dir


def airflow_imported_in_the_sandbox(lambda_logs: Path) -> bool:
    return any(
        "Imported Airflow's task runner" in log.read_text(errors="replace")
        for log in lambda_logs.glob("airflow-task/*.log")
    )


def test_a_task_stopped_at_the_deadline_runs_on_kill_and_then_the_same_try_on_the_fallback(on_kill_stack):
    stack, marks, lambda_logs = on_kill_stack
    # The sandbox's first run imports Airflow's task runner, which takes longer than this function's timeout
    # on a loaded machine: that run falls back (or not), and the import goes on in the sandbox. The task under
    # test must meet a warm sandbox, or the deadline would come before its command started.
    warm_up = stack.trigger("lambda_warm_up")
    assert stack.wait_run("lambda_warm_up", warm_up, timeout=180) == "success", stack.log_dir
    wait_until(lambda: airflow_imported_in_the_sandbox(lambda_logs), 120, "Airflow imported in the sandbox")

    run_id = stack.trigger("lambda_on_kill")
    assert stack.wait_run("lambda_on_kill", run_id, timeout=180) == "success", stack.log_dir

    (ti,) = stack.task_instances("lambda_on_kill", run_id)
    assert (ti["state"], ti["try_number"]) == ("success", 1)  # the same try, no retry spent
    history = stack.sql("SELECT try_number, state FROM task_instance_history WHERE dag_id = 'lambda_on_kill'")
    assert history == []
    # The command started in Lambda, and BashOperator's on_kill signalled it when the handler stopped the run.
    assert (marks / "started").read_text().split() == ["start"]
    assert (marks / "on_kill").read_text().split() == ["on_kill", "try=1"]
    # The stopped run reported no state: the router reset the try and ran it on the fallback.
    external_ids = dict(
        stack.sql("SELECT task_id, external_executor_id FROM task_instance WHERE dag_id = 'lambda_on_kill'")
    )
    assert external_ids == {"bash_on_kill": "local@1"}
    fallbacks = [
        json.loads(extra)
        for event, extra in stack.sql(
            "SELECT event, extra FROM log WHERE dag_id = 'lambda_on_kill' AND event = 'hybrid_router.fallback'"
        )
    ]
    assert [(f["reason"], f["failed_on"], f["executor"]) for f in fallbacks] == [
        ("timeout", "lambda", "local")
    ]
    log = stack.task_log("lambda_on_kill", run_id, "bash_on_kill")
    assert "ran on the fallback" in log

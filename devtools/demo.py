"""``make demo``: a real Airflow routes the demo DAGs between a (local) Lambda function and the Local executor.

Run as ``python -m devtools.demo``. It starts, all on 127.0.0.1 with free ports and in a fresh
AIRFLOW_HOME under the output folder (``demo-output/`` by default):

- moto's server, with the SQS results queue and dead-letter queue the Lambda path uses;
- the local Lambda service, with the demo function (small memory, short timeout, reserved concurrency 3);
- Airflow (API server, scheduler, DAG processor on SQLite) with ``[core] executor =
  hybrid_router.router.RoutingExecutor`` and ``examples/policy.yaml`` as the routing policy.

It runs the DAGs of ``examples/dags/``, then reads what happened from Airflow itself: task instances from the REST
API, the router's audit rows (``log`` table, through the REST API's event logs) and each task's
``external_executor_id``. It prints a routing report, writes it to ``<output>/report.json``, stops every process
it started (whatever happens), and exits 1 when any task's route or final state differs from what ``EXPECTED``
below declares.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from devtools.devstack import (
    LOOPBACK,
    AirflowStack,
    MotoServer,
    StackError,
    free_port,
    local_lambda_settings,
    wait_until,
)
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService
from hybrid_router.router.audit import AUDIT_OWNER, EVENT_FALLBACK, EVENT_ROUTED
from hybrid_router.router.external_id import split_child_id

ROUTER = "hybrid_router.router.RoutingExecutor"
MAIN_DAG = "hybrid_router_demo"
FAILURE_DAG = "hybrid_router_demo_own_failure"
FUNCTION_NAME = "hybrid-router-demo"  # the policy's `lambda` executor names this function
LAMBDA = "lambda"
LOCAL = "local"
ROUTING_EVENTS = (EVENT_ROUTED, EVENT_FALLBACK)

# The demo function. A normal demo task peaks at about 285 MB inside a sandbox (handler, Airflow's supervisor and
# task runner; the "Max Memory Used" of the local service's REPORT lines), so 512 MB fits it and the memory hog's
# 1.2 GB does not. A warm sandbox starts a task in well under a second (the handler forks it from a process that
# imported Airflow once); a cold one pays that import, a few seconds on a busy two-core machine. 15 s leaves room
# for that, and `too_slow` sleeps longer than the whole timeout.
FUNCTION_MEMORY_MB = 512
FUNCTION_TIMEOUT_S = 15
RESERVED_CONCURRENCY = 3
RUN_TIMEOUT_S = 300.0
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Expected:
    """What must happen to one task (every mapped instance of it when ``mapped``)."""

    dag_id: str
    task_id: str
    paths: tuple[tuple[str, ...], ...]  # executor paths accepted, e.g. (("lambda", "local"),) for a fallback
    state: str
    rule: str
    fallback_reason: str | None = None
    mapped: bool = False
    why: str = ""


# Declared, not inferred: the report's observations come from Airflow and are compared with this table.
EXPECTED: tuple[Expected, ...] = (
    Expected(MAIN_DAG, "short_task", ((LAMBDA,),), "success", "short and small", why="short -> Lambda"),
    Expected(
        MAIN_DAG,
        "long_task",
        ((LOCAL,),),
        "success",
        "everything else",
        why="expected 40m from its execution_timeout -> Local",
    ),
    Expected(
        MAIN_DAG, "pinned_task", ((LAMBDA,),), "success", "pinned to lambda by queue", why='queue="lambda"'
    ),
    Expected(
        MAIN_DAG,
        "burst",
        ((LAMBDA,), (LOCAL,)),
        "success",
        "short and small",
        mapped=True,
        why="burst of 8 > reserved concurrency 3: the rest overflow to Local",
    ),
    Expected(
        MAIN_DAG,
        "too_slow",
        ((LAMBDA, LOCAL),),
        "success",
        "short and small",
        fallback_reason="timeout",
        why="outlives the function timeout -> fallback",
    ),
    Expected(
        MAIN_DAG,
        "memory_hog",
        ((LAMBDA, LOCAL),),
        "success",
        "short and small",
        fallback_reason="out_of_memory",
        why="exceeds the function memory -> fallback",
    ),
    Expected(
        FAILURE_DAG,
        "fails_by_its_own_code",
        ((LAMBDA,),),
        "failed",
        "short and small",
        why="its own bug: fails, no fallback",
    ),
)
# The DAG runs' final states: the main DAG's tasks all end in success, the other DAG's one task fails.
EXPECTED_RUN_STATES = {MAIN_DAG: "success", FAILURE_DAG: "failed"}
# The burst is larger than the function's reserved concurrency, so some of it must overflow, and some of it
# must still have run on Lambda (the DAG orders its tasks so that Lambda has free slots when the burst starts).
BURST_TASK = "burst"
SLOW_TASK = "too_slow"
# The main DAG's tasks that run on Lambda before the burst (with SLOW_TASK), and how long the router may take to
# sync a result the Lambda executor has read (its scheduler heartbeat is 1 s).
LAMBDA_FIRST_TASKS = ("short_task", "pinned_task", "memory_hog")
ROUTER_SYNC_S = 2.5


@dataclass
class Observed:
    """One task instance as Airflow recorded it."""

    dag_id: str
    task_id: str
    map_index: int
    state: str | None
    try_number: int
    executors: list[str]  # from the router's audit rows, in order: where each run of this try went
    rule: str | None
    duration_source: str | None  # where the router took the expected duration from
    how: list[str]  # "policy", "overflow", "fallback" per audit row
    fallback_reasons: list[str]
    fallback_details: list[str]
    other_events: list[str]  # the router's other audit rows (a fallback given up, a routing error)
    external_executor_id: str | None
    queued_to_running_s: float | None
    run_s: float | None
    start_date: str | None = None  # of the last run of the try (the fallback's, after a fallback)
    end_date: str | None = None

    @property
    def label(self) -> str:
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"


@dataclass
class Verdict:
    observed: Observed
    expected: Expected | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# -- comparing what happened with what was declared -------------------------------------------------------------


def check(
    expected: Sequence[Expected],
    observed: Sequence[Observed],
    run_states: dict[str, str | None],
    expected_run_states: dict[str, str] = EXPECTED_RUN_STATES,
) -> tuple[list[Verdict], list[str]]:
    """Compare observations with the declared expectations.

    Returns one verdict per observed task instance and the problems that belong to no single task (a missing
    task, a DAG run in the wrong state, a burst that did not overflow).
    """
    general: list[str] = []
    for dag_id, state in expected_run_states.items():
        if run_states.get(dag_id) != state:
            general.append(f"DAG run of {dag_id} ended {run_states.get(dag_id)!r}, expected {state!r}")
    by_task = {(e.dag_id, e.task_id): e for e in expected}
    verdicts = [_check_one(by_task.get((o.dag_id, o.task_id)), o) for o in observed]
    seen = {(o.dag_id, o.task_id) for o in observed}
    general.extend(
        f"{e.dag_id}.{e.task_id} did not run (no task instance)"
        for e in expected
        if (e.dag_id, e.task_id) not in seen
    )
    burst = [o for o in observed if o.task_id == BURST_TASK and o.dag_id == MAIN_DAG]
    if burst:
        overflowed = sum(1 for o in burst if "overflow" in o.how)
        on_lambda = sum(1 for o in burst if o.executors == [LAMBDA])
        if not overflowed:
            general.append(
                f"no {BURST_TASK} task overflowed, though the burst is larger than the function's slots"
            )
        if not on_lambda:
            general.append(f"no {BURST_TASK} task ran on Lambda")
    busiest = max_concurrent([o for o in observed if o.executors == [LAMBDA]])
    if busiest > RESERVED_CONCURRENCY:
        general.append(
            f"{busiest} tasks ran on Lambda at once, more than its reserved concurrency {RESERVED_CONCURRENCY}"
        )
    return verdicts, general


def max_concurrent(runs: Sequence[Observed]) -> int:
    """The most runs whose [start_date, end_date) intervals overlap at one moment."""
    edges = sorted(
        edge
        for run in runs
        if run.start_date and run.end_date
        for edge in ((_timestamp(run.start_date), 1), (_timestamp(run.end_date), -1))
    )
    # An end sorts before a start at the same instant (-1 < 1): back-to-back runs do not overlap.
    busiest = current = 0
    for _, change in edges:
        current += change
        busiest = max(busiest, current)
    return busiest


def _check_one(expected: Expected | None, seen: Observed) -> Verdict:
    verdict = Verdict(seen, expected)
    problems = verdict.problems
    if expected is None:
        problems.append("not declared in the demo's expectations")
        return verdict
    if expected.mapped != (seen.map_index >= 0):
        problems.append("expected a mapped task" if expected.mapped else "expected an unmapped task")
    if seen.state != expected.state:
        problems.append(f"state {seen.state!r}, expected {expected.state!r}")
    path = tuple(seen.executors)
    if path not in expected.paths:
        shown = " or ".join(" -> ".join(p) for p in expected.paths)
        problems.append(f"ran on {' -> '.join(path) or 'nothing'}, expected {shown}")
    if seen.rule != expected.rule:
        problems.append(f"rule {seen.rule!r}, expected {expected.rule!r}")
    if path == (LOCAL,) and expected.mapped and seen.how != ["overflow"]:
        # A burst task on Local is only right as an overflow from Lambda, not as a policy decision.
        problems.append(f"went to Local by {seen.how}, expected an overflow")
    wanted_reasons = [expected.fallback_reason] if expected.fallback_reason else []
    if seen.fallback_reasons != wanted_reasons:
        problems.append(f"fallback reasons {seen.fallback_reasons}, expected {wanted_reasons}")
    if seen.other_events:
        problems.append(f"unexpected router events: {'; '.join(seen.other_events)}")
    if seen.try_number != 1:
        problems.append(f"try {seen.try_number}: a fallback must not spend a retry")
    final_child, _ = split_child_id(seen.external_executor_id)
    if path and final_child != path[-1]:
        problems.append(f"external_executor_id {seen.external_executor_id!r} disagrees with the audit rows")
    return verdict


# -- reading what happened from Airflow -------------------------------------------------------------------------


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((_timestamp(end) - _timestamp(start)).total_seconds(), 2)


def _timestamp(text: str) -> datetime:
    # The REST API writes UTC as "Z", which datetime.fromisoformat accepts only from Python 3.11.
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def observe(stack: AirflowStack, runs: dict[str, str]) -> tuple[list[Observed], dict[str, str | None]]:
    """Task instances (REST API), the router's audit rows (REST event logs) and external executor ids (SQL)."""
    observed: list[Observed] = []
    run_states: dict[str, str | None] = {}
    for dag_id, run_id in runs.items():
        run_states[dag_id] = stack.dag_run(dag_id, run_id)["state"]
        audit = _audit_rows(stack, dag_id, run_id)
        external = {
            (task_id, map_index): value
            for task_id, map_index, value in stack.sql(
                "SELECT task_id, map_index, external_executor_id FROM task_instance WHERE dag_id = ? AND run_id = ?",
                (dag_id, run_id),
            )
        }
        for ti in sorted(stack.task_instances(dag_id, run_id), key=lambda t: (t["task_id"], t["map_index"])):
            key = (ti["task_id"], ti["map_index"])
            rows = [
                (event, extra)
                for (task_id, map_index, try_number, event, extra) in audit
                if (task_id, map_index) == key and try_number == ti["try_number"]
            ]
            runs_of_try = [extra for event, extra in rows if event in ROUTING_EVENTS]
            routed = next((extra for event, extra in rows if event == EVENT_ROUTED), {})
            fallbacks = [extra for event, extra in rows if event == EVENT_FALLBACK]
            observed.append(
                Observed(
                    dag_id=dag_id,
                    task_id=ti["task_id"],
                    map_index=ti["map_index"],
                    state=ti["state"],
                    try_number=ti["try_number"],
                    executors=[r.get("executor", "?") for r in runs_of_try],
                    rule=routed.get("rule"),
                    duration_source=routed.get("duration_source"),
                    how=[r.get("how", "?") for r in runs_of_try],
                    fallback_reasons=[r.get("reason", "?") for r in fallbacks],
                    fallback_details=[r.get("detail") or "" for r in fallbacks],
                    other_events=[
                        f"{event}: {json.dumps(extra, sort_keys=True)}"
                        for event, extra in rows
                        if event not in ROUTING_EVENTS
                    ],
                    external_executor_id=external.get(key),
                    queued_to_running_s=_seconds_between(ti.get("queued_when"), ti.get("start_date")),
                    run_s=_seconds_between(ti.get("start_date"), ti.get("end_date")),
                    start_date=ti.get("start_date"),
                    end_date=ti.get("end_date"),
                )
            )
    return observed, run_states


def _audit_rows(
    stack: AirflowStack, dag_id: str, run_id: str
) -> list[tuple[str, int, int, str, dict[str, Any]]]:
    """The router's audit rows of one DAG run, oldest first: (task_id, map_index, try_number, event, extra)."""
    query = "&".join(
        [
            f"dag_id={dag_id}",
            f"run_id={quote(run_id, safe='')}",
            f"owner={AUDIT_OWNER}",
            "order_by=id",
            "limit=1000",
        ]
    )
    rows = stack.api("GET", f"/api/v2/eventLogs?{query}")["event_logs"]
    return [
        (row["task_id"], row["map_index"], row["try_number"], row["event"], json.loads(row["extra"] or "{}"))
        for row in rows
    ]


# -- the report -------------------------------------------------------------------------------------------------


def report_dict(
    verdicts: Sequence[Verdict],
    general: Sequence[str],
    run_states: dict[str, str | None],
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "ok": not general and all(v.ok for v in verdicts),
        "dag_runs": run_states,
        "problems": list(general),
        "timings_s": timings,
        "tasks": [
            {
                **asdict(v.observed),
                "label": v.observed.label,
                "expected": asdict(v.expected) if v.expected else None,
                "ok": v.ok,
                "problems": v.problems,
            }
            for v in verdicts
        ],
    }


def print_report(verdicts: Sequence[Verdict], general: Sequence[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="Routing report (from Airflow's task instances and the router's audit rows)",
        caption="queued->running: the task instance's queued_when to start_date; after a fallback, those of the "
        "run on the fallback executor. Details per task: report.json",
    )
    for column in ("task", "rule", "executor(s)", "outcome", "queued->running", "fallback reason", "check"):
        table.add_column(column)
    for verdict in verdicts:
        seen = verdict.observed
        path = " -> ".join(seen.executors) or "-"
        if "overflow" in seen.how:
            path += " (overflow)"
        latency = "-" if seen.queued_to_running_s is None else f"{seen.queued_to_running_s:.2f}s"
        check_text = "[green]ok[/]" if verdict.ok else "[red]" + "; ".join(verdict.problems) + "[/]"
        table.add_row(
            seen.label if seen.dag_id == MAIN_DAG else f"{seen.dag_id}.{seen.label}",
            seen.rule or "-",
            path,
            seen.state or "-",
            latency,
            ", ".join(seen.fallback_reasons) or "-",
            check_text,
        )
    # Piped output (CI, tests) gets a wide table rather than rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for problem in general:
        console.print(f"[red]problem:[/] {problem}")


def print_intro(home: Path, policy: Path) -> None:
    cwd = Path.cwd()
    airflow = (
        f"AIRFLOW_HOME={_relative(home, cwd)} {_relative(Path(sys.executable).with_name('airflow'), cwd)}"
    )
    shown_policy = _relative(policy, cwd)
    print(
        "airflow-hybrid-router demo: Airflow + the router + a local Lambda service + moto's SQS, on 127.0.0.1"
    )
    print("To explore the routing (during or after the demo; simulate reads the demo's task history):")
    print(f"  {airflow} hybrid-router validate {shown_policy}")
    print(
        f"  {airflow} hybrid-router explain --policy {shown_policy} --dag-id {MAIN_DAG} --task-id long_task "
        "--expected-duration 40m"
    )
    print(f"  {airflow} hybrid-router simulate --policy {shown_policy} --from-db")
    print(flush=True)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


# -- running it -------------------------------------------------------------------------------------------------


def airflow_config(
    *,
    policy: Path,
    results_queue_url: str,
    dead_letter_queue_url: str,
    signing_secret: str,
    lambda_endpoint_url: str,
    sqs_endpoint_url: str,
    local_log_dir: Path,
) -> dict[str, dict[str, Any]]:
    """The demo's own settings (on top of AirflowStack's), the ones examples/airflow.cfg explains to users."""
    return {
        "hybrid_router": {"policy_file": policy},
        "lambda_executor": local_lambda_settings(
            function_name=FUNCTION_NAME,
            results_queue_url=results_queue_url,
            dead_letter_queue_url=dead_letter_queue_url,
            signing_secret=signing_secret,
            lambda_endpoint_url=lambda_endpoint_url,
            sqs_endpoint_url=sqs_endpoint_url,
            local_log_dir=local_log_dir,
        ),
    }


def _step(message: str, since: float) -> None:
    print(f"[{time.monotonic() - since:6.1f}s] {message}", flush=True)


def _lambda_work_done(
    stack: AirflowStack, run_id: str, service: LocalLambdaService, sqs: Any, results_queue: str
) -> bool:
    """True once the main DAG's tasks before the burst are off Lambda and the router has every result.

    Off Lambda: short_task, pinned_task and memory_hog ended, too_slow timed out (its fallback is recorded). The
    function then runs nothing, and the results queue is empty, so the Lambda executor has read every result: the
    router frees a slot when it syncs that result, within a heartbeat (ROUTER_SYNC_S is waited on top).
    """
    stack.check_alive()  # a dead scheduler or API server fails at once, with the tail of its log
    ended = {
        ti["task_id"] for ti in stack.task_instances(MAIN_DAG, run_id) if ti["state"] in ("success", "failed")
    }
    if not ended.issuperset(LAMBDA_FIRST_TASKS):
        return False
    slow_moved_on = SLOW_TASK in ended or any(
        task_id == SLOW_TASK and event == EVENT_FALLBACK
        for task_id, _, _, event, _ in _audit_rows(stack, MAIN_DAG, run_id)
    )
    function = service.stats()["functions"].get(FUNCTION_NAME, {})
    if not slow_moved_on or function.get("in_flight") or function.get("queued"):
        return False
    attributes = sqs.get_queue_attributes(
        QueueUrl=results_queue,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return all(int(value) == 0 for value in attributes.values())


def _run_dags(
    stack: AirflowStack, service: LocalLambdaService, sqs: Any, results_queue: str, began: float
) -> tuple[dict[str, str], str | None]:
    """Trigger the demo DAGs and wait for their runs; returns the run ids and why waiting stopped early, if it did."""
    runs: dict[str, str] = {}
    try:
        runs[MAIN_DAG] = stack.trigger(MAIN_DAG)
        _step(f"triggered {MAIN_DAG}", began)
        # The failing task must find a free Lambda slot without taking one from the tasks the main DAG expects on
        # Lambda: run it once those are done with Lambda, while too_slow runs on Local.
        wait_until(
            lambda: _lambda_work_done(stack, runs[MAIN_DAG], service, sqs, results_queue),
            RUN_TIMEOUT_S,
            f"{MAIN_DAG}'s first Lambda runs to end",
            interval=0.5,
        )
        time.sleep(ROUTER_SYNC_S)
        runs[FAILURE_DAG] = stack.trigger(FAILURE_DAG)
        _step(f"Lambda idle; triggered {FAILURE_DAG}", began)
        for dag_id, run_id in runs.items():
            state = stack.wait_run(dag_id, run_id, timeout=RUN_TIMEOUT_S)
            _step(f"{dag_id} finished: {state}", began)
    except StackError as error:
        # Report what did happen (and stop everything) rather than only a traceback.
        _step(f"gave up waiting: {error}", began)
        return runs, str(error)
    return runs, None


def run_demo(output: Path, examples: Path) -> int:
    began = time.monotonic()
    dags = examples / "dags"
    policy = examples / "policy.yaml"
    for needed in (dags, policy):
        if not needed.exists():
            print(f"error: {needed} not found; run the demo from the project's checkout", file=sys.stderr)
            return 2
    output.mkdir(parents=True, exist_ok=True)
    home = output / "airflow-home"
    # A fresh Airflow every time: an old database's run history would change the duration estimates.
    shutil.rmtree(home, ignore_errors=True)
    report_file = output / "report.json"
    report_file.unlink(missing_ok=True)
    print_intro(home, policy)

    secret = secrets.token_hex(32)
    lambda_port = free_port()
    lambda_logs = home / "lambda-logs"
    timings: dict[str, float] = {}
    with ExitStack() as cleanup:
        moto = MotoServer(log_dir=home / "process-logs")
        cleanup.callback(moto.stop)
        moto.start()
        results_queue = moto.create_queue(f"{FUNCTION_NAME}-results")
        dead_letter_queue = moto.create_queue(f"{FUNCTION_NAME}-dlq")
        _step(f"moto's SQS at {moto.url}: results queue and dead-letter queue created", began)

        stack = AirflowStack(
            home=home,
            dags_folder=dags,
            executor=ROUTER,
            config=airflow_config(
                policy=policy.resolve(),
                results_queue_url=results_queue,
                dead_letter_queue_url=dead_letter_queue,
                signing_secret=secret,
                lambda_endpoint_url=f"http://{LOOPBACK}:{lambda_port}",
                sqs_endpoint_url=moto.url,
                local_log_dir=lambda_logs,
            ),
        )
        function = FunctionConfig(
            name=FUNCTION_NAME,
            handler="hybrid_router.lambda_exec.handler.handler",
            memory_mb=FUNCTION_MEMORY_MB,
            timeout_s=FUNCTION_TIMEOUT_S,
            reserved_concurrency=RESERVED_CONCURRENCY,
            dead_letter_queue_url=dead_letter_queue,
            maximum_retry_attempts=0,  # the router decides where a failed run goes next, not Lambda
            environment={
                **stack.env,
                "HYBRID_ROUTER_SIGNING_SECRET": secret,
                "AWS_ENDPOINT_URL_SQS": moto.url,
            },
        )
        service = LocalLambdaService(
            functions=[function],
            env=stack.env,
            sqs_endpoint_url=moto.url,
            port=lambda_port,
            log_dir=lambda_logs,
        )
        cleanup.callback(service.stop)
        service.start()
        _step(
            f"local Lambda service at {service.url}: function {FUNCTION_NAME} ({FUNCTION_MEMORY_MB} MB, "
            f"{FUNCTION_TIMEOUT_S}s timeout, reserved concurrency {RESERVED_CONCURRENCY})",
            began,
        )

        cleanup.callback(stack.stop)
        stack.start()
        timings["stack_ready"] = round(time.monotonic() - began, 1)
        _step(f"Airflow API server at {stack.api_url} (executor {ROUTER}); logs in {stack.log_dir}", began)

        runs, waiting_problem = _run_dags(stack, service, moto.client("sqs"), results_queue, began)
        timings["runs_done"] = round(time.monotonic() - began, 1)
        observed, run_states = observe(stack, runs)
        _step("stopping every process the demo started", began)
    timings["total"] = round(time.monotonic() - began, 1)

    verdicts, general = check(EXPECTED, observed, run_states)
    if waiting_problem:
        general.insert(0, waiting_problem)
    report = report_dict(verdicts, general, run_states, timings)
    report_file.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print_report(verdicts, general)
    print(
        f"Report written to {_relative(report_file, Path.cwd())}; Airflow's logs are in {_relative(home, Path.cwd())}"
    )
    print(
        f"Total time: {timings['total']:.1f}s (Airflow ready after {timings['stack_ready']:.1f}s, "
        f"DAG runs done after {timings['runs_done']:.1f}s)"
    )
    if not report["ok"]:
        print(
            "DEMO FAILED: some outcomes differ from the expected ones (see the check column)", file=sys.stderr
        )
        return 1
    print("Every task went where the policy says and ended as expected.")
    return 0


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so the finally blocks stop every server the demo started.
    raise SystemExit(128 + signum)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", type=Path, default=Path("demo-output"), help="folder for the report and the Airflow home"
    )
    parser.add_argument(
        "--examples",
        type=Path,
        default=REPO_ROOT / "examples",
        help="folder with dags/ and policy.yaml (default: the checkout's examples/)",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return run_demo(args.output.resolve(), args.examples.resolve())
    except KeyboardInterrupt:
        print("interrupted; every process the demo started was stopped", file=sys.stderr)
        return 130
    except StackError as error:
        print(f"DEMO FAILED: {error}\nEvery process the demo started was stopped.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

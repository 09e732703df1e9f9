"""Running the demo: start moto's SQS, the local Lambda service and Airflow, run the DAGs, stop everything.

``main`` is ``python -m devtools.demo`` (``make demo``); the package docstring says what the demo shows.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import devtools.demo
from devtools.demo.expected import (
    BIG_FUNCTION_MEMORY_MB,
    BIG_FUNCTION_NAME,
    BIG_FUNCTION_TIMEOUT_S,
    BIG_RESERVED_CONCURRENCY,
    EXPECTED,
    FAILURE_DAG,
    FUNCTION_MEMORY_MB,
    FUNCTION_NAME,
    FUNCTION_TIMEOUT_S,
    MAIN_DAG,
    MEMORY_DAG,
    RESERVED_CONCURRENCY,
    check,
    check_explanation,
)
from devtools.demo.observed import audit_rows, observe
from devtools.demo.report import (
    display_path,
    print_command,
    print_intro,
    print_report,
    print_simulation,
    report_dict,
)
from devtools.devstack import LOOPBACK, AirflowStack, MotoServer, StackError, free_port, wait_until
from devtools.lambda_settings import local_lambda_settings
from devtools.postgres import PostgresServer
from hybrid_router.lambda_exec.local.launcher import FunctionConfig, LocalLambdaService
from hybrid_router.router.audit import EVENT_FALLBACK
from hybrid_router.router.shared_capacity import COUNT_EVERY_S, RUN_END_GRACE_S
from hybrid_router.router.ui.plugin import PAGE as ROUTING_PAGE

ROUTER = "hybrid_router.router.RoutingExecutor"
RUN_TIMEOUT_S = 300.0
REPO_ROOT = Path(__file__).resolve().parents[2]
SLOW_TASK = "too_slow"
# The main DAG's tasks that run on Lambda before the burst (with SLOW_TASK), and how long the router may take to
# sync a result the Lambda executor has read (its scheduler heartbeat is 1 s).
LAMBDA_FIRST_TASKS = ("short_task", "pinned_task")
ROUTER_SYNC_S = 2.5
HA_TASKS_PER_PASS = 3
HA_HISTORY_CACHE_TTL_S = 2
# The policy `simulate --compare` sets beside the demo's, when the examples folder has it.
COMPARED_POLICY = "policy-one-size.yaml"
MEMORY_TASK = "memory_hog"


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

    Off Lambda: short_task and pinned_task ended, too_slow timed out (its fallback is recorded); then
    ``_lambda_idle``.
    """
    stack.check_alive()  # a dead scheduler or API server fails at once, with the tail of its log
    ended = {
        ti["task_id"] for ti in stack.task_instances(MAIN_DAG, run_id) if ti["state"] in ("success", "failed")
    }
    if not ended.issuperset(LAMBDA_FIRST_TASKS):
        return False
    slow_moved_on = SLOW_TASK in ended or any(
        task_id == SLOW_TASK and event == EVENT_FALLBACK
        for task_id, _, _, event, _ in audit_rows(stack, MAIN_DAG, run_id)
    )
    return slow_moved_on and _lambda_idle(service, sqs, results_queue)


def _lambda_idle(service: LocalLambdaService, sqs: Any, results_queue: str) -> bool:
    """True once the small function runs nothing and the results queue is empty, so the Lambda executor has read
    every result: the router frees a slot when it syncs that result, within a heartbeat (ROUTER_SYNC_S is waited
    on top). A task is marked done a few seconds before its Lambda run ends (the task runner winds down)."""
    function = service.stats()["functions"].get(FUNCTION_NAME, {})
    if function.get("in_flight") or function.get("queued"):
        return False
    attributes = sqs.get_queue_attributes(
        QueueUrl=results_queue,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return all(int(value) == 0 for value in attributes.values())


def _run_dags(
    stack: AirflowStack,
    service: LocalLambdaService,
    sqs: Any,
    results_queue: str,
    began: float,
    settle_s: float = ROUTER_SYNC_S,
) -> tuple[list[tuple[str, str]], str | None]:
    """Trigger the demo DAGs and wait for their runs; returns (dag_id, run_id) in the order they were triggered
    and why waiting stopped early, if it did. ``settle_s``: how long every router takes to see the small function
    idle once it is."""
    runs: list[tuple[str, str]] = []

    def trigger(dag_id: str, what: str = "") -> tuple[str, str]:
        runs.append((dag_id, stack.trigger(dag_id)))
        _step(f"{what}triggered {dag_id}", began)
        return runs[-1]

    def wait(dag_id: str, run_id: str) -> None:
        state = stack.wait_run(dag_id, run_id, timeout=RUN_TIMEOUT_S)
        _step(f"{dag_id} finished: {state}", began)

    try:
        _, main_run = trigger(MAIN_DAG)
        # The failing task must find a free Lambda slot without taking one from the tasks the main DAG expects on
        # Lambda: run it once those are done with Lambda, while too_slow runs on Local.
        wait_until(
            lambda: _lambda_work_done(stack, main_run, service, sqs, results_queue),
            RUN_TIMEOUT_S,
            f"{MAIN_DAG}'s first Lambda runs to end",
            interval=0.5,
        )
        time.sleep(settle_s)
        trigger(FAILURE_DAG, "Lambda idle; ")
        for dag_id, run_id in list(runs):
            wait(dag_id, run_id)
        # The memory hog's death on the small function ends its sandbox: after the burst, so that the burst
        # finds warm sandboxes there (a cold one can outlast the short timeout on a loaded machine), and once
        # the burst's runs there have ended, so that it finds a free slot.
        wait_until(
            lambda: _lambda_idle(service, sqs, results_queue), RUN_TIMEOUT_S, "Lambda idle", interval=0.5
        )
        time.sleep(settle_s)
        wait(*trigger(MEMORY_DAG, "Lambda idle; "))
        # Its next run goes where the first one finished, by what the router learned from its death.
        wait(*trigger(MEMORY_DAG, "again: "))
    except StackError as error:
        # Report what did happen (and stop everything) rather than only a traceback.
        _step(f"gave up waiting: {error}", began)
        return runs, str(error)
    return runs, None


def _compare_policies(stack: AirflowStack, policy: Path, other: Path, html: Path) -> dict[str, Any]:
    """``simulate --from-db --compare`` on the demo's history, with its HTML report written to ``html``."""
    # Relative to the working directory, which the command shares, where they can be: its report names them.
    options = {"--policy": policy, "--compare": other, "--html": html}
    args = [part for option, path in options.items() for part in (option, display_path(path, Path.cwd()))]
    return {**_command(stack, "simulate", "--from-db", *args), "html": str(html)}


def _explain_learned(stack: AirflowStack, policy: Path) -> dict[str, Any]:
    """``explain`` for the memory hog after its two runs: where it goes next and what the router learned."""
    args = ["--policy", display_path(policy, Path.cwd()), "--dag-id", MEMORY_DAG, "--task-id", MEMORY_TASK]
    return _command(stack, "explain", *args)


def _command(stack: AirflowStack, *args: str) -> dict[str, Any]:
    """``airflow hybrid-router *args`` against the demo's Airflow: the command line, exit code and output."""
    result = stack.cli("hybrid-router", *args)
    return {
        "command": " ".join(["airflow hybrid-router", *args]),
        "returncode": result.returncode,
        "output": result.stdout,
        "errors": result.stderr,
    }


def _serve(stack: AirflowStack) -> None:
    """Keep Airflow (and the demo's Lambda and SQS) running until SIGINT or SIGTERM, for a look at its UI."""
    # The auth manager logs every browser in as an admin (simple_auth_manager_all_admins): no password to give.
    print(f"Routing page: {stack.api_url}{ROUTING_PAGE}", flush=True)
    print(f"Airflow UI: {stack.api_url}/ (Ctrl-C stops every process the demo started)", flush=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            stack.check_alive()  # a component that dies while serving ends the demo with its log's tail
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(
    output: Path, examples: Path, *, postgres: bool = False, schedulers: int = 1, serve: bool = False
) -> int:
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
    simulation_html = output / "simulate.html"
    simulation_html.unlink(missing_ok=True)
    compared = examples / COMPARED_POLICY
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
        database_url = None
        if postgres:
            database = PostgresServer()
            cleanup.callback(database.stop)
            database_url = database.start().url
            _step(f"PostgreSQL at {LOOPBACK}:{database.port}: Airflow's metadata database", began)

        config = airflow_config(
            policy=policy.resolve(),
            results_queue_url=results_queue,
            dead_letter_queue_url=dead_letter_queue,
            signing_secret=secret,
            lambda_endpoint_url=f"http://{LOOPBACK}:{lambda_port}",
            sqs_endpoint_url=moto.url,
            local_log_dir=lambda_logs,
        )
        if schedulers > 1:
            # A few tasks per scheduling pass, so that every scheduler queues some of the DAGs' tasks: with
            # Airflow's default (16) the first scheduler to reach them often queues them all.
            config["scheduler"] = {"max_tis_per_query": HA_TASKS_PER_PASS}
            # A router counts the deaths it saw at once, another scheduler's at its next read of the history: the
            # memory hog's second run may be queued by the scheduler that did not see the first one die.
            config["hybrid_router"]["history_cache_ttl"] = HA_HISTORY_CACHE_TTL_S
        stack = AirflowStack(
            home=home,
            dags_folder=dags,
            executor=ROUTER,
            database_url=database_url,
            schedulers=schedulers,
            config=config,
        )
        function = FunctionConfig(
            name=FUNCTION_NAME,
            handler="hybrid_router.lambda_exec.handler.handler",
            memory_mb=FUNCTION_MEMORY_MB,
            timeout_s=FUNCTION_TIMEOUT_S,
            reserved_concurrency=RESERVED_CONCURRENCY,
            dead_letter_queue_url=dead_letter_queue,
            maximum_retry_attempts=0,  # the router decides where a failed run goes next, not Lambda
            # No signing secret: each event carries the key that signs its own results.
            environment={**stack.env, "AWS_ENDPOINT_URL_SQS": moto.url},
        )
        big_function = function.replace(
            name=BIG_FUNCTION_NAME,
            memory_mb=BIG_FUNCTION_MEMORY_MB,
            timeout_s=BIG_FUNCTION_TIMEOUT_S,
            reserved_concurrency=BIG_RESERVED_CONCURRENCY,
        )
        service = LocalLambdaService(
            functions=[function, big_function],
            env=stack.env,
            sqs_endpoint_url=moto.url,
            port=lambda_port,
            log_dir=lambda_logs,
        )
        cleanup.callback(service.stop)
        service.start()
        _step(
            f"local Lambda service at {service.url}: function {FUNCTION_NAME} ({FUNCTION_MEMORY_MB} MB, "
            f"{FUNCTION_TIMEOUT_S}s timeout, reserved concurrency {RESERVED_CONCURRENCY}) and "
            f"{BIG_FUNCTION_NAME} ({BIG_FUNCTION_MEMORY_MB} MB, {BIG_FUNCTION_TIMEOUT_S}s timeout, reserved "
            f"concurrency {BIG_RESERVED_CONCURRENCY})",
            began,
        )

        cleanup.callback(stack.stop)
        stack.start()
        timings["stack_ready"] = round(time.monotonic() - began, 1)
        _step(f"Airflow API server at {stack.api_url} (executor {ROUTER}); logs in {stack.log_dir}", began)
        if schedulers > 1:
            _step(
                f"{schedulers} schedulers ({', '.join(stack.scheduler_names)}), each with its router", began
            )

        # Another scheduler's router counts a run on the function until RUN_END_GRACE_S after its task ended.
        settle_s = ROUTER_SYNC_S + (RUN_END_GRACE_S + COUNT_EVERY_S if schedulers > 1 else 0.0)
        runs, waiting_problem = _run_dags(
            stack, service, moto.client("sqs"), results_queue, began, settle_s=settle_s
        )
        timings["runs_done"] = round(time.monotonic() - began, 1)
        observed, run_states = observe(stack, runs)
        _step(f"explain: where {MEMORY_TASK} goes next, by what the router learned", began)
        explanation = _explain_learned(stack, policy)
        simulation = None
        if compared.exists():
            _step(f"simulate: the demo's history under {policy.name} and {compared.name}", began)
            simulation = _compare_policies(stack, policy, compared, simulation_html)
        outcome = (
            observed, run_states, waiting_problem, explanation, simulation, timings, report_file, home, schedulers
        )  # fmt: skip
        if serve:  # the report now; then Airflow stays up for a look until Ctrl-C
            code = _conclude(began, *outcome)
            _serve(stack)
        _step("stopping every process the demo started", began)
    return code if serve else _conclude(began, *outcome)


def _conclude(
    began: float,
    observed: list[Any],
    run_states: dict[str, list[str | None]],
    waiting_problem: str | None,
    explanation: dict[str, Any],
    simulation: dict[str, Any] | None,
    timings: dict[str, float],
    report_file: Path,
    home: Path,
    schedulers: int,
) -> int:
    """Check what happened against the expectations, write and print the report; the exit code."""
    timings["total"] = round(time.monotonic() - began, 1)
    verdicts, general = check(EXPECTED, observed, run_states)
    if waiting_problem:
        general.insert(0, waiting_problem)
    general.extend(check_explanation(explanation))
    if simulation is not None and simulation["returncode"] != 0:
        general.append(f"simulate --compare failed with exit code {simulation['returncode']}")
    report = report_dict(verdicts, general, run_states, timings, simulation, explanation)
    report_file.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print_report(verdicts, general, by_scheduler=schedulers > 1)
    print_command(explanation)
    if simulation is not None:
        print_simulation(simulation, Path.cwd())
    print(
        f"Report written to {display_path(report_file, Path.cwd())}; Airflow's logs are in {display_path(home, Path.cwd())}"
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
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo", description=devtools.demo.__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--output", type=Path, default=Path("demo-output"), help="folder for the report and the Airflow home"
    )
    parser.add_argument(
        "--examples",
        type=Path,
        default=REPO_ROOT / "examples",
        help="folder with dags/ and policy.yaml (default: the checkout's examples/)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="keep Airflow's metadata in a PostgreSQL cluster of the demo's own (needs PostgreSQL's server "
        "programs) instead of SQLite",
    )
    parser.add_argument(
        "--schedulers",
        type=int,
        default=1,
        help="run this many schedulers, each with its router (Airflow's HA topology; needs --postgres)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="after the report, keep Airflow running and print its Routing page's URL, until Ctrl-C",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.schedulers < 1:
        parser.error("--schedulers must be at least 1")
    if args.schedulers > 1 and not args.postgres:
        # argparse's error exits 2 with the usage line, before anything is started.
        parser.error(
            f"--schedulers {args.schedulers} needs --postgres: SQLite allows one scheduler only. "
            f'Run: make demo DEMO_ARGS="--postgres --schedulers {args.schedulers}"'
        )
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return run_demo(
            args.output.resolve(),
            args.examples.resolve(),
            postgres=args.postgres,
            schedulers=args.schedulers,
            serve=args.serve,
        )
    except KeyboardInterrupt:
        print("interrupted; every process the demo started was stopped", file=sys.stderr)
        return 130
    except StackError as error:
        print(f"DEMO FAILED: {error}\nEvery process the demo started was stopped.", file=sys.stderr)
        return 1

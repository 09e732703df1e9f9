"""End to end: one run per try through a real scheduler, whatever AWS and the network do, one fault at a time.

Real Airflow (API server, scheduler, DAG processor on SQLite) with ``LambdaExecutor``, the local Lambda service
running the project's real handler, and moto's SQS: one stack for the module, the faults applied in turn. SQLite,
because the test checks each task's external id: on PostgreSQL the scheduler skips the executor's events of task
instances locked at that moment (``skip_locked``), and a RUNNING event that names the run was seen dropped while the
task's success was being written. (Two overlapping copies of one event could both claim a try on SQLite:
``test_e2e_duplicates.py``, on PostgreSQL, covers that.) Each fault has a DAG of its own whose short tasks append a
start and an end line to a journal (``devtools/run_journal.py``); for each one: every try's body completed exactly
once, in one Lambda run, no two runs of a try overlapped, every task succeeded at its first try (the DAGs allow a
retry, so a spent one shows as try 2), and the task instance's external id names the run that did the work.

Where each fault comes from (the product's code is the same as in production):

- lost Invoke answers: the local Lambda service accepts the event and answers 500 or closes the connection
  (``lambda_exec/local/faults.py``, switched on at runtime);
- failed SQS sends from the handler, receives failing for seconds, expired credentials: botocore's event hooks
  (``devtools/aws_faults.py``) in the sandboxes and in the scheduler, whose settings are re-read from a file at
  every call, so the same processes go through each fault in turn. Credentials expire for the scheduler's
  principal (its Invoke and its SQS calls); the function has a role of its own, which Lambda keeps fresh;
- poison messages: sent straight to the results queue by the test, beside the real results.

Duplicate deliveries are ``test_e2e_duplicates.py``'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from devtools.aws_faults import FaultsFile, SqsFaults, injected, process_env
from devtools.devstack import StackError, wait_until
from devtools.lambda_settings import airflow_with_local_lambda, all_deliveries_ended
from devtools.run_journal import JOURNAL_DAG_HELPERS, check_journal, read_journal
from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.external_id import parse_lambda_external_id
from hybrid_router.lambda_exec.local.faults import FaultSettings
from hybrid_router.lambda_exec.local.launcher import FunctionConfig
from hybrid_router.lambda_exec.protocol import Outcome, Phase, ResultMessage, TaskRef

pytestmark = pytest.mark.e2e

SECRET = "e2e-faults-secret"
FUNCTION = "airflow-task"
# Well above a task's few seconds on a loaded two-core machine, cold sandbox included (importing Airflow's task
# runner alone was seen to take 27 s there): a run stopped at the deadline would be an infrastructure failure.
FUNCTION_TIMEOUT_S = 60
RUN_TIMEOUT_S = 150
RECEIVE_OUTAGE_S = 5.0
# How long the credentials stay expired after the first Invoke they refused: several refused attempts.
EXPIRED_AFTER_FIRST_REFUSAL_S = 3.0
# High enough that some of a few tasks' sends fail on every run (all six succeeding: 0.2 ** 6).
SEND_FAILURE_RATE = 0.8
TASKS = 3
# Longer than the executor's first back-off after a lost Invoke answer (0.5 s and up to 1 s of jitter).
LATE_REPORT_S = 2.0

# One DAG per fault (the journal tells them apart); a retry is allowed so that a spent one shows as try 2.
DAGS = """
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

TASK_S = 0.5


def fault_dag(dag_id, tasks, with_first=False):
    @dag(
        dag_id=dag_id,
        schedule=None,
        start_date=pendulum.datetime(2024, 1, 1),
        catchup=False,
        default_args={"retries": 1, "retry_delay": timedelta(seconds=1)},
    )
    def journaled():
        @task
        def body(i):
            journaled_body(TASK_S)

        mapped = body.expand(i=list(range(tasks)))
        if with_first:

            @task
            def first():
                journaled_body(TASK_S)

            first() >> mapped

    return journaled()


for name in ("receive_outage", "expired_credentials", "failed_sends"):
    fault_dag(f"fault_{name}", %(tasks)d)
fault_dag("fault_lost_answers", %(tasks)d + 1)
fault_dag("fault_poison", %(tasks)d, with_first=True)
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("lambda-e2e-faults")
    dags = root / "dags"
    dags.mkdir()
    journal = root / "journal.txt"
    journal.touch()
    (dags / "fault_dags.py").write_text(
        JOURNAL_DAG_HELPERS % {"journal": str(journal)} + DAGS % {"tasks": TASKS}
    )
    scheduler_faults = FaultsFile(root / "scheduler-faults.json")
    function_faults = FaultsFile(root / "function-faults.json")
    base_pythonpath = os.environ.get("PYTHONPATH")
    function = FunctionConfig(
        name=FUNCTION,
        memory_mb=512,
        timeout_s=FUNCTION_TIMEOUT_S,
        reserved_concurrency=TASKS,  # two cores: more parallel task runners only queue for the CPU
        maximum_retry_attempts=0,
        environment=process_env(function_faults, base_pythonpath),
    )
    with airflow_with_local_lambda(
        root,
        dags,
        executor="hybrid_router.lambda_exec.LambdaExecutor",
        function=function,
        secret=SECRET,
        scheduler_env=process_env(scheduler_faults, base_pythonpath),
    ) as lambda_stack:
        yield SimpleNamespace(
            airflow=lambda_stack.airflow,
            service=lambda_stack.service,
            sqs=lambda_stack.moto.client("sqs"),
            results_queue_url=lambda_stack.results_queue_url,
            dead_letter_queue_url=lambda_stack.dead_letter_queue_url,
            journal=journal,
            scheduler_faults=scheduler_faults,
            function_faults=function_faults,
        )


@pytest.fixture
def fault(stack, tmp_path) -> Iterator[SimpleNamespace]:
    """The stack, with a log of this test's injected AWS faults, its part of the scheduler's log, and every
    fault off again after the test with nothing of its runs left in flight (a failed test leaves the next ones
    alone: the executor invokes nothing beyond the function's reserved concurrency)."""
    scheduler_log = stack.airflow.process_log("scheduler")
    log_at = scheduler_log.stat().st_size
    runs: list[tuple[str, str]] = []

    def trigger(dag_id: str) -> str:
        runs.append((dag_id, stack.airflow.trigger(dag_id)))
        return runs[-1][1]

    yield SimpleNamespace(
        **vars(stack),
        trigger=trigger,
        faults_log=tmp_path / "aws-faults.jsonl",
        scheduler_log=lambda: _log_since(scheduler_log, log_at),
    )
    stack.scheduler_faults.write(SqsFaults())
    stack.function_faults.write(SqsFaults())
    stack.service.set_delivery_faults(settings=FaultSettings())
    for dag_id, run_id in runs:
        with contextlib.suppress(StackError):
            stack.airflow.wait_run(dag_id, run_id, timeout=RUN_TIMEOUT_S)
    wait_until(lambda: all_deliveries_ended(stack.service, FUNCTION), 90, "every invocation to end")


def _log_since(path: Path, offset: int) -> str:
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _queue_depth(stack: SimpleNamespace, url: str) -> int:
    attributes = stack.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return sum(int(value) for value in attributes.values())


def _run_and_check(
    fault: SimpleNamespace,
    dag_id: str,
    run_id: str,
    *,
    tasks: int,
    first: bool = False,
    results_may_be_lost: bool = False,
) -> None:
    """The run succeeded, every try's body completed exactly once on Lambda, no retry was spent; unless a run's
    results may be lost (then the executor learns of it from the DLQ), the executor knew each run and saw no
    infrastructure failure."""
    airflow = fault.airflow
    assert airflow.wait_run(dag_id, run_id, timeout=RUN_TIMEOUT_S) == "success"
    expected = {(dag_id, "body", i) for i in range(tasks)} | ({(dag_id, "first", -1)} if first else set())
    tis = airflow.task_instances(dag_id, run_id)
    assert {(dag_id, ti["task_id"], ti["map_index"]) for ti in tis} == expected, tis
    assert {ti["state"] for ti in tis} == {"success"}, tis
    assert {ti["try_number"] for ti in tis} == {1}, tis

    lines = [line for line in read_journal(fault.journal) if line.dag_id == dag_id]
    report = check_journal(lines, expected)
    assert report.clean, (report, lines)
    assert report.stopped_runs == 0 and not report.retried, (report, lines)
    assert set(report.completed.values()) == {1}, (report, lines)
    runs = {line.task: line.run for line in lines}
    assert not [run for run in runs.values() if run.startswith("pid")], lines  # every body ran on Lambda

    if not results_may_be_lost:
        # The run that did the work is the one the executor bound the try to. The executor may learn of it after
        # the task's state reached the database (results delayed by a fault): wait for it to say so.
        def bound_runs() -> dict[tuple[str, str, int], str] | None:
            rows = airflow.sql(
                "select task_id, map_index, external_executor_id from task_instance "
                "where dag_id = ? and run_id = ?",
                (dag_id, run_id),
            )
            named = {(dag_id, task, index): parse_lambda_external_id(ext) for task, index, ext in rows}
            return {t: p.run_id for t, p in named.items() if p and p.run_id} if all(named.values()) else None

        wait_until(lambda: len(bound_runs() or ()) == len(expected), 60, "the executor to report each run")
        assert bound_runs() == runs

    scheduler_log = fault.scheduler_log()
    assert "but the task instance's state attribute is" not in scheduler_log  # no "state mismatch"
    assert "could not handle message" not in scheduler_log
    if not results_may_be_lost:
        assert "lambda infrastructure failure" not in scheduler_log


def test_results_wait_out_a_receive_outage(fault):
    """The scheduler's receives fail for seconds while the tasks run: results only come later, nothing is
    declared dead or failed."""
    outage_at = time.time()
    fault.scheduler_faults.write(SqsFaults(outage_at=outage_at, outage_s=600, log_file=str(fault.faults_log)))
    dag_id = "fault_receive_outage"
    run_id = fault.trigger(dag_id)
    # The outage ends RECEIVE_OUTAGE_S after a task's run took it (its /run put it in `running`): that run's
    # results, sent since, are received only after the outage.
    wait_until(
        lambda: {ti["state"] for ti in fault.airflow.task_instances(dag_id, run_id)} & {"running", "success"},
        RUN_TIMEOUT_S,
        "a task to run",
    )
    outage_s = time.time() - outage_at + RECEIVE_OUTAGE_S
    fault.scheduler_faults.write(
        SqsFaults(outage_at=outage_at, outage_s=outage_s, log_file=str(fault.faults_log))
    )
    _run_and_check(fault, dag_id, run_id, tasks=TASKS)
    assert injected(fault.faults_log).get("receive_failed", 0) >= 2


def test_expired_credentials_delay_the_invokes_and_spend_no_retry(fault):
    """The scheduler's credentials expire: Lambda refuses its Invokes (ExpiredTokenException) and SQS its
    receives. A refused Invoke was never accepted: the executor pauses and invokes again once they are fresh."""
    expired = SqsFaults(
        credentials_expired_at=time.time(), credentials_expired_s=600, log_file=str(fault.faults_log)
    )
    fault.scheduler_faults.write(expired)
    dag_id = "fault_expired_credentials"
    run_id = fault.trigger(dag_id)

    def invoke_refused() -> bool:
        return injected(fault.faults_log, by="operation").get("lambda.Invoke", 0) > 0

    wait_until(invoke_refused, RUN_TIMEOUT_S, "an Invoke to be refused for its credentials")
    time.sleep(EXPIRED_AFTER_FIRST_REFUSAL_S)
    # The credentials are fresh again (a role session renewed).
    fault.scheduler_faults.write(SqsFaults(log_file=str(fault.faults_log)))
    _run_and_check(fault, dag_id, run_id, tasks=TASKS)

    refused = injected(fault.faults_log, by="operation")
    assert refused.get("lambda.Invoke", 0) >= 1 and refused.get("sqs.ReceiveMessage", 0) >= 1, refused
    assert "refused for its credentials (ExpiredTokenException" in fault.scheduler_log()


def test_lost_invoke_answers_start_each_try_once(fault):
    """Every Invoke answer is lost (a 500 or a closed connection, in turn) though Lambda accepted the event: the
    executor invokes the same dispatch again until a run reports, so several events run per dispatch; the
    execution API lets one claim the try, the others report not_claimed."""
    accepted_before = fault.service.stats()["functions"][FUNCTION]["async_accepted"]
    fault.service.set_delivery_faults(settings=FaultSettings(lost_answer_rate=1.0, lost_answer_mode="mixed"))
    # The runs' reports reach the results queue later than the executor's first back-off ends (at most 1.5 s):
    # a run that reported first would rightly spare its dispatch a second invoke.
    fault.function_faults.write(SqsFaults(send_delay_s=LATE_REPORT_S, log_file=str(fault.faults_log)))
    dag_id = "fault_lost_answers"
    tasks = TASKS + 1
    run_id = fault.trigger(dag_id)
    _run_and_check(fault, dag_id, run_id, tasks=tasks)
    fault.service.set_delivery_faults(settings=FaultSettings())
    fault.function_faults.write(SqsFaults())
    wait_until(lambda: all_deliveries_ended(fault.service, FUNCTION), 90, "every copy to end")

    stats = fault.service.stats()
    assert stats["faults"]["invoke_answers_lost"] >= tasks, stats
    # Invokes whose answers were lost were sent again until a run reported: each dispatch's event went twice or more.
    assert stats["functions"][FUNCTION]["async_accepted"] - accepted_before >= 2 * tasks, stats
    scheduler_log = fault.scheduler_log()
    assert "(ServiceException" in scheduler_log  # the 500s
    assert "(ConnectionClosedError" in scheduler_log  # the closed connections


def test_failed_sends_from_the_handler_lose_no_task(fault):
    """Some of the handler's SQS sends fail after botocore's retries: a STARTED is sent again; a FINISHED that
    cannot be sent fails the invocation, so the event reaches the DLQ. The task's state is already in Airflow's
    database: the dead letter changes nothing, and the try is not run again."""
    before = fault.service.stats()["functions"][FUNCTION]
    fault.function_faults.write(
        SqsFaults(send_failure_rate=SEND_FAILURE_RATE, log_file=str(fault.faults_log))
    )
    dag_id = "fault_failed_sends"
    run_id = fault.trigger(dag_id)
    # A run whose FINISHED was lost is known to the executor from its dead letter: an infrastructure failure it
    # reports for a task whose success is in the database already, which Airflow leaves as it is.
    _run_and_check(fault, dag_id, run_id, tasks=TASKS, results_may_be_lost=True)
    fault.function_faults.write(SqsFaults())

    def dead_letters() -> tuple[int, int, int] | None:
        """Invocations that failed, their dead letters, and those the executor applied, once all are in."""
        counts = fault.service.stats()["functions"][FUNCTION]
        failed = counts["handled_error"] - before["handled_error"]
        sent = counts["dlq_sends"] - before["dlq_sends"]
        applied = sum(
            f"dag_id='{dag_id}'" in line and "lambda infrastructure failure: dead_lettered" in line
            for line in fault.scheduler_log().splitlines()
        )
        ended = all_deliveries_ended(fault.service, FUNCTION)
        return (failed, sent, applied) if ended and failed == sent == applied else None

    # They come after the run ended: each one's effect (none) is checked here, not left to the next test.
    wait_until(dead_letters, 60, "every dead letter to reach the executor")
    assert injected(fault.faults_log).get("send_failed", 0) >= 1
    tis = fault.airflow.task_instances(dag_id, run_id)
    assert {(ti["state"], ti["try_number"]) for ti in tis} == {("success", 1)}, tis
    assert "but the task instance's state attribute is" not in fault.scheduler_log()


def _result(
    dispatch_id: str, *, outcome: Outcome = Outcome.FAILED, sent_at: float | None = None
) -> ResultMessage:
    return ResultMessage(
        phase=Phase.FINISHED,
        dispatch_id=dispatch_id,
        task=TaskRef("fault_poison", "first", "forged", 1, -1),
        sent_at=time.time() if sent_at is None else sent_at,
        outcome=outcome,
        return_code=1,
        run_id=uuid.uuid4().hex,
        claimed=True,
    )


def test_poison_messages_are_dropped_once_and_real_results_still_arrive(fault):
    """Malformed and forged messages land in the results queue while tasks run: each malformed one is logged
    once and deleted; a validly signed replay for a finished dispatch changes nothing and is deleted; one for a
    dispatch nobody here holds is left for its owner. The real results still arrive."""
    airflow = fault.airflow
    dag_id = "fault_poison"
    run_id = fault.trigger(dag_id)

    def first_done() -> str | None:
        rows = airflow.sql(
            "select state, external_executor_id from task_instance "
            "where dag_id = ? and run_id = ? and task_id = 'first'",
            (dag_id, run_id),
        )
        return rows[0][1] if rows and rows[0][0] == "success" else None

    finished = parse_lambda_external_id(wait_until(first_done, RUN_TIMEOUT_S, "the first task to succeed"))
    assert finished is not None
    # Once the executor has reported it (its dispatch retired), a replay of its result is one for a finished
    # dispatch; before, it would be another run's result for a current one (test_run_binding.py's case).
    wait_until(
        lambda: f"TaskInstance Finished: dag_id={dag_id}, task_id=first," in fault.scheduler_log(),
        RUN_TIMEOUT_S,
        "the executor to report the first task",
    )
    valid_text = json.loads(protocol.seal_result(_result("x"), b"k"))["payload"]
    malformed = {
        "non-ASCII signature": json.dumps(
            {"v": 2, "payload": valid_text, "sig": "é" * 64}, ensure_ascii=False
        ),
        "lone surrogate": json.dumps({"v": 2, "payload": '{"dispatch_id": "\ud800"}', "sig": "0" * 64}),
        "bad JSON": '{"v": 2, "payload": ',
        "wrong signature": protocol.seal_result(_result(finished.dispatch_id), b"not the dispatch's key"),
        "stale": protocol.seal_result(
            _result(finished.dispatch_id, sent_at=time.time() - 7 * 3600),
            protocol.result_key(SECRET, finished.dispatch_id),
        ),
    }
    replay = protocol.seal_result(
        _result(finished.dispatch_id), protocol.result_key(SECRET, finished.dispatch_id)
    )
    unknown_dispatch = uuid.uuid4().hex
    unowned = protocol.seal_result(_result(unknown_dispatch), protocol.result_key(SECRET, unknown_dispatch))
    sent = {
        what: fault.sqs.send_message(QueueUrl=fault.results_queue_url, MessageBody=body)["MessageId"]
        for what, body in {**malformed, "replay": replay, "unowned": unowned}.items()
    }

    _run_and_check(fault, dag_id, run_id, tasks=TASKS, first=True)
    # What is left in the queue: the message for a dispatch another scheduler may hold (deleted only once older
    # than unowned_message_max_age), and nothing else.
    wait_until(lambda: _queue_depth(fault, fault.results_queue_url) == 1, 60, "the poison to be deleted")
    scheduler_log = fault.scheduler_log()
    for what in malformed:
        lines = [line for line in scheduler_log.splitlines() if f"message {sent[what]} " in line]
        assert len(lines) == 1 and "Deleting a results message" in lines[0], (what, lines)
    for what in ("replay", "unowned"):
        assert sent[what] not in scheduler_log, what
    assert "Traceback" not in scheduler_log

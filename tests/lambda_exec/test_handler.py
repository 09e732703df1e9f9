"""The in-Lambda handler called directly in a sandbox of the test's own, with a fake context, a tiny fake
workload (run as a new process) and moto's SQS: results, settings, the deadline watch and the cold-start rule.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import ClientError

from hybrid_router.lambda_exec import handler as handler_mod
from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.handler import (
    FORK_ENV,
    MARGIN_ENV,
    SECRET_ENV,
    STARTED_GRACE_ENV,
    HandlerConfigError,
    RunSettings,
    Sandbox,
    handle,
)
from hybrid_router.lambda_exec.protocol import Outcome, Phase
from hybrid_router.lambda_exec.tree_memory import MIB, TreeMemory

from .handler_support import (
    FAKE_TOKEN,
    SECRET,
    FakeCommand,
    FakeContext,
    make_event,
    make_sandbox,
    results,
    run_past_the_deadline,
    sealed,
    until_finished,
    wait_gone,
)

if TYPE_CHECKING:
    from moto_sqs import Moto


@pytest.fixture
def fake_command() -> FakeCommand:
    return FakeCommand()


def test_a_run_longer_than_the_grace_reports_started_then_finished(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand, tmp_path: Path
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0.2"}, workload_command=fake_command)
    record = tmp_path / "record.json"
    # Long enough for the handler's first scan of the workload's process tree, and past the grace.
    event = make_event(results_queue, {"exit": 0, "record": str(record), "sleep": 0.8})

    before = time.time()
    answer = handle(sealed(event), FakeContext(60), sandbox)

    assert answer == {"status": "success", "return_code": 0}
    started, finished = until_finished(moto_server, results_queue)
    assert started.phase is Phase.STARTED and finished.phase is Phase.FINISHED
    assert finished.outcome is Outcome.SUCCESS and finished.return_code == 0
    # STARTED went out at the end of the grace, while the workload still ran.
    assert 0.15 <= started.sent_at - started.started_at < finished.sent_at - started.started_at
    for message in (started, finished):
        assert before <= message.started_at <= started.sent_at
        assert message.dispatch_id == event.dispatch_id
        assert message.task == event.task
        assert message.request_id == "req-1"
        assert message.function_name == "airflow-task"
        assert message.log_stream == "2026/11/24/[$LATEST]abcdef"
    # The workload (token inside) went through a private file, not the command line, and the file is gone.
    seen = json.loads(record.read_text())
    # What the task left running in its process group is swept when it exits.
    assert wait_gone(seen["grandchild"])
    workload_path = seen["argv"][1]
    assert "token" not in " ".join(seen["argv"])
    assert not os.path.exists(workload_path)


def test_finished_carries_the_runs_billed_duration_and_the_sandboxs_peak_memory(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    # The sandbox is this process and everything below it (the workload's processes); the workload holds
    # 200 MB of its own for a while.
    before_mb = TreeMemory(os.getpid()).sample() / MIB
    context = FakeContext(60)
    context.memory_limit_in_mb = "10240"  # a string, as Lambda's runtime gives it
    event = make_event(results_queue, {"exit": 0, "alloc_mb": 200, "sleep": 0.8})
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0.2"}, workload_command=fake_command)

    begin = time.monotonic()
    handle(sealed(event), context, sandbox)
    elapsed_ms = (time.monotonic() - begin) * 1000

    started, finished = until_finished(moto_server, results_queue)
    assert started.usage is None  # the figures are the whole run's: FINISHED only
    usage = finished.usage
    assert usage is not None and usage.memory_size_mb == 10240
    assert 800 < usage.duration_ms < elapsed_ms
    assert usage.billed_duration_ms == math.ceil(usage.duration_ms)
    assert usage.peak_memory_mb >= before_mb + 190


def test_string_event_and_nonzero_exit_is_failed(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    event = make_event(results_queue, {"exit": 3})

    answer = handle(
        protocol.seal_event(event, SECRET.encode()),
        FakeContext(60),
        make_sandbox(workload_command=fake_command),
    )

    assert answer["status"] == "failed"
    finished = until_finished(moto_server, results_queue)[-1]
    assert finished.outcome is Outcome.FAILED
    assert finished.return_code == 3
    assert "3" in finished.detail


def test_deadline_watch_kills_the_group_and_reports_timeout(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand, tmp_path: Path
) -> None:
    sandbox = make_sandbox({MARGIN_ENV: "1.5"}, workload_command=fake_command)
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"sleep": 60, "record": str(record)})

    finished = run_past_the_deadline(sandbox, event, record, moto_server, results_queue)
    assert "before the Lambda deadline" in finished.detail


def test_expired_event_reports_and_does_not_run(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    event = make_event(results_queue, {"exit": 0}, not_after_in=-5)

    answer = handle(sealed(event), FakeContext(60), make_sandbox(workload_command=fake_command))

    assert answer == {"status": "event_expired"}
    assert fake_command.calls == []
    (finished,) = results(moto_server, results_queue, 1)
    assert finished.phase is Phase.FINISHED
    assert finished.outcome is Outcome.EVENT_EXPIRED
    assert finished.usage is not None and finished.usage.billed_duration_ms >= 1  # an invocation Lambda bills


@pytest.mark.parametrize("tamper", ["old_version", "no_result_key", "garbage", "wrong_kind"])
def test_bad_event_runs_nothing_and_never_logs_the_token(
    results_queue: str,
    moto_server: Moto,
    fake_command: FakeCommand,
    caplog: pytest.LogCaptureFixture,
    tamper: str,
) -> None:
    event = make_event(results_queue, {"token": FAKE_TOKEN})
    body: Any = json.loads(protocol.seal_event(event, SECRET))
    if tamper == "old_version":  # signed by an executor of the previous protocol: no result key
        body["v"] = 1
    elif tamper == "no_result_key":
        payload = json.loads(body["payload"])
        del payload["result_key"]
        body["payload"] = json.dumps(payload)
    elif tamper == "garbage":
        body = "not json " + FAKE_TOKEN
    else:
        body = json.loads(protocol.seal({"kind": "other", "token": FAKE_TOKEN}, SECRET.encode()))

    with caplog.at_level(logging.DEBUG):
        answer = handle(body, FakeContext(60), make_sandbox(workload_command=fake_command))

    assert answer["status"] == "rejected"
    assert fake_command.calls == []
    assert FAKE_TOKEN not in caplog.text
    assert moto_server.receive_all(results_queue, 1, timeout=1) == []


def test_task_output_reaches_stdout_with_the_token_scrubbed(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand, capfd: pytest.CaptureFixture[str]
) -> None:
    event = make_event(results_queue, {"token": FAKE_TOKEN})

    handle(sealed(event), FakeContext(60), make_sandbox(workload_command=fake_command))

    out, _ = capfd.readouterr()
    assert "workload output line <token>" in out
    assert FAKE_TOKEN not in out


def test_a_run_shorter_than_the_grace_reports_finished_alone(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    event = make_event(results_queue, {"exit": 0})

    before = time.time()
    answer = handle(sealed(event), FakeContext(60), make_sandbox(workload_command=fake_command))

    assert answer["status"] == "success" and len(fake_command.calls) == 1
    (finished,) = until_finished(moto_server, results_queue)
    assert finished.phase is Phase.FINISHED and finished.outcome is Outcome.SUCCESS
    # The start time the executor records for the run travels in FINISHED.
    assert before <= finished.started_at < finished.sent_at - 0.01
    # Nothing follows: the STARTED held back is cancelled, not sent late.
    time.sleep(handler_mod.DEFAULT_STARTED_GRACE_S)
    assert moto_server.receive_all(results_queue, 1, timeout=1) == []


def test_unsendable_result_raises_so_lambda_fails_the_invocation(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    event = make_event(results_queue + "-does-not-exist", {"exit": 0})

    with pytest.raises(ClientError):
        handle(sealed(event), FakeContext(60), make_sandbox(workload_command=fake_command))
    assert len(fake_command.calls) == 1  # a short run learns it at FINISHED


def test_with_no_grace_an_unsendable_started_stops_the_run_once_it_claimed(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand, tmp_path: Path
) -> None:
    record = tmp_path / "record.json"
    event = make_event(results_queue + "-does-not-exist", {"sleep": 60, "record": str(record)})

    begin = time.monotonic()
    with pytest.raises(ClientError):  # FINISHED (UNREPORTED) cannot be sent either
        handle(
            sealed(event),
            FakeContext(60),
            make_sandbox({STARTED_GRACE_ENV: "0"}, workload_command=fake_command),
        )
    # A missing queue is an answer that will not change: the run is stopped at once, not after 30 s.
    assert time.monotonic() - begin < 10
    pids = json.loads(record.read_text())
    assert wait_gone(pids["pid"]) and wait_gone(pids["grandchild"])


def test_with_no_grace_started_goes_out_as_soon_as_the_run_claimed(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0"}, workload_command=fake_command)
    handle(sealed(make_event(results_queue, {"exit": 0, "sleep": 0.5})), FakeContext(60), sandbox)
    started, finished = until_finished(moto_server, results_queue)
    assert started.phase is Phase.STARTED and finished.phase is Phase.FINISHED
    assert started.claimed and finished.claimed and started.run_id == finished.run_id


def test_started_grace_setting(results_queue: str, moto_server: Moto, fake_command: FakeCommand) -> None:
    assert handler_mod.started_grace_s({}) == handler_mod.DEFAULT_STARTED_GRACE_S
    assert handler_mod.started_grace_s({STARTED_GRACE_ENV: " 2.5 "}) == 2.5
    for bad in ("soon", "-1", "600"):
        with pytest.raises(HandlerConfigError, match=STARTED_GRACE_ENV):
            handler_mod.started_grace_s({STARTED_GRACE_ENV: bad})
    # Checked before anything runs: a misconfigured function fails the invocation, not the task.
    sandbox = make_sandbox({STARTED_GRACE_ENV: "later"}, workload_command=fake_command)
    with pytest.raises(HandlerConfigError, match=STARTED_GRACE_ENV):
        handle(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60), sandbox)
    assert fake_command.calls == []


def test_fork_setting_is_checked_before_anything_runs(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    assert handler_mod.fork_wanted({}) is True
    assert handler_mod.fork_wanted({FORK_ENV: "No"}) is False
    sandbox = make_sandbox({FORK_ENV: "sometimes"}, workload_command=fake_command)
    with pytest.raises(HandlerConfigError, match=FORK_ENV):
        handle(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60), sandbox)
    assert fake_command.calls == []
    assert moto_server.receive_all(results_queue, 1, timeout=1) == []  # not even STARTED


def test_a_secret_left_on_the_function_is_ignored_and_kept_from_the_task(
    results_queue: str,
    moto_server: Moto,
    fake_command: FakeCommand,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Older releases set the executor's secret on the function, where a trailing newline made every event
    # "rejected" and every task could read it. The function needs none now: the event carries its key.
    monkeypatch.setenv(SECRET_ENV, SECRET + "\n")
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"exit": 0, "record": str(record)})

    with caplog.at_level(logging.DEBUG):
        sandbox = Sandbox(workload_command=fake_command)  # this process's own environment, as on Lambda
        answer = handle(sealed(event), FakeContext(60), sandbox)

    assert answer == {"status": "success", "return_code": 0}
    finished = until_finished(moto_server, results_queue)[-1]  # opened with the executor's secret
    assert finished.dispatch_id == event.dispatch_id and finished.outcome is Outcome.SUCCESS
    assert SECRET_ENV not in json.loads(record.read_text())["environ"]  # what the task process saw
    assert SECRET_ENV not in os.environ
    assert SECRET_ENV in caplog.text and SECRET not in caplog.text


def test_an_event_signed_with_another_secret_runs_but_its_results_change_nothing(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    # The function holds no key to check an event with: IAM decides who may invoke it. A forged event carries a
    # result key the executor never derived, so its results are refused like any forged result.
    event = make_event(results_queue, {"exit": 0})

    body = json.loads(protocol.seal_event(event, "another-secret"))
    answer = handle(body, FakeContext(60), make_sandbox(workload_command=fake_command))

    assert answer["status"] == "success"
    (message,) = moto_server.receive_all(results_queue, 1, timeout=10)
    with pytest.raises(protocol.MessageError, match="bad signature"):
        protocol.open_result(message["Body"], SECRET)


def test_deadline_margin() -> None:
    def margin(remaining_s: float, **environ: str) -> float:
        return RunSettings.from_environ(environ).margin_for(remaining_s)

    assert margin(900) == 5.0
    assert margin(20) == pytest.approx(2.0)
    assert margin(20, **{MARGIN_ENV: "7.5"}) == 7.5
    with pytest.raises(HandlerConfigError, match="expected a number"):
        margin(20, **{MARGIN_ENV: "soon"})
    with pytest.raises(HandlerConfigError, match="negative"):
        margin(20, **{MARGIN_ENV: "-1"})


def test_the_entry_point_keeps_one_sandbox_per_process() -> None:
    sandbox = handler_mod.this_sandbox()
    assert handler_mod.this_sandbox() is sandbox
    # Lambda's own environment, and Airflow's task runner for the fork path (imported on first use only).
    assert sandbox.environ is os.environ
    assert sandbox.task_runner is not None and not sandbox.task_runner.settled
    # A custom command always starts as a new process: no task runner for it.
    assert Sandbox(workload_command=FakeCommand()).task_runner is None


def test_a_sandbox_creates_its_missing_home(tmp_path: Path) -> None:
    home = tmp_path / "tmp" / "home"
    Sandbox(environ={"HOME": str(home)})
    assert home.is_dir()


# The new modules' imports against a bare interpreter's: only the standard library and the wire-message module.
IMPORT_PROBE = r"""
import json, sys
before = set(sys.modules)
import hybrid_router.lambda_exec.handler, hybrid_router.lambda_exec.task_runner
import hybrid_router.lambda_exec.process_tree
new = set(sys.modules) - before
print(json.dumps(sorted(
    name for name in new
    if name.split(".")[0] not in sys.stdlib_module_names
)))
"""


def test_handler_modules_import_only_the_standard_library_and_the_wire_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == [
        "hybrid_router",
        "hybrid_router.lambda_exec",
        "hybrid_router.lambda_exec.claim",
        "hybrid_router.lambda_exec.handler",
        "hybrid_router.lambda_exec.process_tree",
        "hybrid_router.lambda_exec.protocol",
        "hybrid_router.lambda_exec.run_hostname",
        "hybrid_router.lambda_exec.started_notice",
        "hybrid_router.lambda_exec.task_runner",
        "hybrid_router.lambda_exec.tree_memory",
        "hybrid_router.lambda_exec.wire_fields",
    ]


# Run identity: each delivered copy of an event is its own run; only the run whose /run claimed the task reports
# STARTED or a claimed FINISHED, and a copy refused by /run (409) reports NOT_CLAIMED, never a failure.


def test_a_copy_refused_by_run_reports_not_claimed_and_never_started(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0"}, workload_command=fake_command)
    # The refusal comes after the grace: a STARTED sent on the grace alone would say the copy runs the task.
    event = make_event(results_queue, {"claim": "refused", "claim_after": 0.5})

    answer = handle(sealed(event), FakeContext(60), sandbox)

    assert answer == {"status": Outcome.NOT_CLAIMED.value, "return_code": 1}
    (finished,) = until_finished(moto_server, results_queue)
    assert finished.phase is Phase.FINISHED and finished.outcome is Outcome.NOT_CLAIMED
    assert not finished.claimed and finished.run_id
    assert not finished.outcome.is_infrastructure and "409" in finished.detail


@pytest.mark.parametrize(
    ("spec", "not_after_in", "answer"),
    [
        ({"claim": "refused"}, 600.0, {"status": "not_claimed", "return_code": 1}),
        ({"exit": 0}, -5.0, {"status": "event_expired"}),
    ],
    ids=["not_claimed", "event_expired"],
)
def test_a_run_that_never_held_the_task_does_not_fail_its_invocation_when_it_cannot_report(
    spec: dict[str, Any],
    not_after_in: float,
    answer: dict[str, Any],
    results_queue: str,
    fake_command: FakeCommand,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A failed invocation puts the event in the DLQ under the request id every delivered copy shares: the
    # executor took that dead letter for the death of the copy holding the task, and the router ran the try again
    # on the fallback while that copy ran it (seen in benchmarks/chaos_soak.py).
    event = make_event(results_queue + "-does-not-exist", spec, not_after_in=not_after_in)

    with caplog.at_level(logging.WARNING, logger=handler_mod.log.name):
        assert handle(sealed(event), FakeContext(60), make_sandbox(workload_command=fake_command)) == answer
    assert "this run never held the task" in caplog.text


def test_a_claimed_run_says_so_in_started_and_finished(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand, tmp_path: Path
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "0.2"}, workload_command=fake_command)
    record = tmp_path / "record.json"
    # The claim comes 1 s in, well after the grace: STARTED waits for it.
    event = make_event(results_queue, {"claim_after": 1.0, "sleep": 0.5, "record": str(record)})

    assert handle(sealed(event), FakeContext(60), sandbox) == {"status": "success", "return_code": 0}

    started, finished = until_finished(moto_server, results_queue)
    assert started.phase is Phase.STARTED and started.claimed
    assert started.sent_at - started.started_at >= 1.0
    assert finished.outcome is Outcome.SUCCESS and finished.claimed
    assert started.run_id == finished.run_id != ""
    # The workload's processes know their run (a task can name it in what it writes).
    assert json.loads(record.read_text())["environ"]["HYBRID_ROUTER_RUN_ID"] == started.run_id


def test_a_short_claimed_run_sends_a_claimed_finished_alone(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    sandbox = make_sandbox({STARTED_GRACE_ENV: "1.0"}, workload_command=fake_command)
    handle(sealed(make_event(results_queue, {"exit": 3})), FakeContext(60), sandbox)
    (finished,) = until_finished(moto_server, results_queue)
    assert finished.outcome is Outcome.FAILED and finished.claimed


def test_each_delivered_copy_of_an_event_is_its_own_run(
    results_queue: str, moto_server: Moto, fake_command: FakeCommand
) -> None:
    sandbox = make_sandbox(workload_command=fake_command)
    event = make_event(results_queue, {"exit": 0})
    handle(sealed(event), FakeContext(60), sandbox)
    handle(sealed(event), FakeContext(60, request_id="req-1"), sandbox)  # the same request id, as AWS does
    first, second = results(moto_server, results_queue, 2)
    assert first.dispatch_id == second.dispatch_id and first.run_id != second.run_id

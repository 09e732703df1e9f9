"""The in-Lambda handler called directly, with a fake context, a tiny fake workload and moto's SQS."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from botocore.exceptions import ClientError
from hybrid_router.lambda_exec import handler as handler_mod
from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.protocol import InvokeEvent, Outcome, Phase, TaskRef

from .conftest import SECRET, Moto

FAKE_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0aSJ9.c2lnbmF0dXJl"

# Stands in for `python -m airflow.sdk.execution_time.execute_workload --json-path FILE`: reads the workload
# file like the real one and acts on it. Like Airflow's supervisor with its task runner, it can start a
# grandchild in a process group of its own, to prove the handler kills the whole tree, not just one group.
FAKE_WORKLOAD = r"""
import json, os, subprocess, sys, time
path = sys.argv[1]
spec = json.loads(open(path).read())
record = spec.get("record")
if record:
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    with open(record, "w") as out:
        json.dump({"pid": os.getpid(), "grandchild": grandchild.pid, "argv": sys.argv}, out)
print("workload output line", spec.get("token", ""), flush=True)
time.sleep(spec.get("sleep", 0))
sys.exit(spec.get("exit", 0))
"""


class FakeContext:
    def __init__(self, timeout_s: float, request_id: str = "req-1"):
        self.aws_request_id = request_id
        self.function_name = "airflow-task"
        self.memory_limit_in_mb = 1024
        self.log_stream_name = "2026/11/24/[$LATEST]abcdef"
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@pytest.fixture
def fake_workload(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def build(path: str) -> list[str]:
        command = [sys.executable, "-c", FAKE_WORKLOAD, path]
        calls.append(command)
        return command

    monkeypatch.setattr(handler_mod, "build_workload_command", build)
    return calls


@pytest.fixture
def results_queue(aws_env: dict[str, str], moto_server: Moto, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(handler_mod.SECRET_ENV, SECRET)
    monkeypatch.delenv(handler_mod.MARGIN_ENV, raising=False)
    return moto_server.new_queue("results")[0]


def make_event(queue_url: str, spec: dict[str, Any], not_after_in: float = 600.0) -> InvokeEvent:
    now = time.time()
    return InvokeEvent(
        dispatch_id=uuid.uuid4().hex,
        task=TaskRef("dag", "task", "run-1", 1),
        workload=json.dumps(spec),
        results_queue_url=queue_url,
        issued_at=now,
        not_after=now + not_after_in,
    )


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def results(moto: Moto, queue_url: str, expected: int) -> list[protocol.ResultMessage]:
    messages = moto.receive_all(queue_url, expected, timeout=10)
    return [protocol.open_result(m["Body"], SECRET.encode()) for m in messages]


def sealed(event: InvokeEvent) -> dict[str, Any]:
    # Lambda's runtime hands the handler the parsed JSON payload: the envelope as a dict.
    return json.loads(protocol.seal_event(event, SECRET.encode()))


def test_success_reports_started_then_finished(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]], tmp_path: Path
) -> None:
    record = tmp_path / "record.json"
    # Long enough for the handler's first scan of the workload's process tree.
    event = make_event(results_queue, {"exit": 0, "record": str(record), "sleep": 0.5})

    answer = handler_mod.handler(sealed(event), FakeContext(60))

    assert answer == {"status": "success", "return_code": 0}
    started, finished = results(moto_server, results_queue, 2)
    assert started.phase is Phase.STARTED and finished.phase is Phase.FINISHED
    assert finished.outcome is Outcome.SUCCESS and finished.return_code == 0
    for message in (started, finished):
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


def test_string_event_and_nonzero_exit_is_failed(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]]
) -> None:
    event = make_event(results_queue, {"exit": 3})

    answer = handler_mod.handler(protocol.seal_event(event, SECRET.encode()), FakeContext(60))

    assert answer["status"] == "failed"
    _, finished = results(moto_server, results_queue, 2)
    assert finished.outcome is Outcome.FAILED
    assert finished.return_code == 3
    assert "3" in finished.detail


def test_deadline_watch_kills_the_group_and_reports_timeout(
    results_queue: str,
    moto_server: Moto,
    fake_workload: list[list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(handler_mod.MARGIN_ENV, "1.5")
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"sleep": 60, "record": str(record)})

    begin = time.monotonic()
    answer = handler_mod.handler(sealed(event), FakeContext(3.0))
    elapsed = time.monotonic() - begin

    assert answer["status"] == "timeout"
    # Stopped at remaining <= 1.5 s, i.e. ~1.5 s in, plus at most the 1 s SIGTERM grace.
    assert elapsed < 3.0
    _, finished = results(moto_server, results_queue, 2)
    assert finished.outcome is Outcome.TIMEOUT
    assert "before the Lambda deadline" in finished.detail
    pids = json.loads(record.read_text())
    assert wait_gone(pids["pid"]) and wait_gone(pids["grandchild"])


def test_expired_event_reports_and_does_not_run(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]]
) -> None:
    event = make_event(results_queue, {"exit": 0}, not_after_in=-5)

    answer = handler_mod.handler(sealed(event), FakeContext(60))

    assert answer == {"status": "event_expired"}
    assert fake_workload == []
    (finished,) = results(moto_server, results_queue, 1)
    assert finished.phase is Phase.FINISHED
    assert finished.outcome is Outcome.EVENT_EXPIRED


@pytest.mark.parametrize("tamper", ["forged", "garbage", "wrong_kind"])
def test_bad_event_runs_nothing_and_never_logs_the_token(
    results_queue: str,
    moto_server: Moto,
    fake_workload: list[list[str]],
    caplog: pytest.LogCaptureFixture,
    tamper: str,
) -> None:
    event = make_event(results_queue, {"token": FAKE_TOKEN})
    if tamper == "forged":
        body: Any = json.loads(protocol.seal_event(event, b"another-secret"))
    elif tamper == "garbage":
        body = "not json " + FAKE_TOKEN
    else:
        body = json.loads(protocol.seal({"kind": "other", "token": FAKE_TOKEN}, SECRET.encode()))

    with caplog.at_level(logging.DEBUG):
        answer = handler_mod.handler(body, FakeContext(60))

    assert answer["status"] == "rejected"
    assert fake_workload == []
    assert FAKE_TOKEN not in caplog.text
    assert moto_server.receive_all(results_queue, 1, timeout=1) == []


def test_task_output_reaches_stdout_with_the_token_scrubbed(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]], capfd: pytest.CaptureFixture[str]
) -> None:
    event = make_event(results_queue, {"token": FAKE_TOKEN})

    handler_mod.handler(sealed(event), FakeContext(60))

    out, _ = capfd.readouterr()
    assert "workload output line <token>" in out
    assert FAKE_TOKEN not in out


def test_unsendable_result_raises_so_lambda_fails_the_invocation(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]]
) -> None:
    missing_queue = results_queue + "-does-not-exist"
    event = make_event(missing_queue, {"exit": 0})

    with pytest.raises(ClientError):
        handler_mod.handler(sealed(event), FakeContext(60))
    assert fake_workload == []  # STARTED could not be sent: the task was not started either


def test_missing_secret_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(handler_mod.SECRET_ENV, raising=False)
    with pytest.raises(handler_mod.HandlerConfigError, match=handler_mod.SECRET_ENV):
        handler_mod.handler({}, FakeContext(60))


def test_deadline_margin() -> None:
    assert handler_mod.deadline_margin_s(900, environ={}) == 5.0
    assert handler_mod.deadline_margin_s(20, environ={}) == pytest.approx(2.0)
    assert handler_mod.deadline_margin_s(20, environ={handler_mod.MARGIN_ENV: "7.5"}) == 7.5
    with pytest.raises(handler_mod.HandlerConfigError, match="expected a number"):
        handler_mod.deadline_margin_s(20, environ={handler_mod.MARGIN_ENV: "soon"})
    with pytest.raises(handler_mod.HandlerConfigError, match="negative"):
        handler_mod.deadline_margin_s(20, environ={handler_mod.MARGIN_ENV: "-1"})


def test_handler_module_imports_nothing_heavy_at_start() -> None:
    code = (
        "import sys; import hybrid_router.lambda_exec.handler; "
        "heavy = [m for m in ('boto3', 'botocore', 'airflow', 'pydantic') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_the_real_workload_command_runs_airflows_task_runner(results_queue: str, moto_server: Moto) -> None:
    """No monkeypatching: Airflow's execute_workload reads the workload file and rejects an invalid one."""
    event = make_event(results_queue, {"not": "an ExecuteTask workload"})

    answer = handler_mod.handler(sealed(event), FakeContext(120))

    assert answer["status"] == "failed" and answer["return_code"] != 0
    _, finished = results(moto_server, results_queue, 2)
    assert finished.outcome is Outcome.FAILED

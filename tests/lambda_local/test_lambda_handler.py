"""The in-Lambda handler called directly, with a fake context, a tiny fake workload and moto's SQS."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
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
    monkeypatch.delenv(handler_mod.STARTED_GRACE_ENV, raising=False)
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


def until_finished(moto: Moto, queue_url: str, timeout: float = 10.0) -> list[protocol.ResultMessage]:
    """The results of one run, in the order sent, up to its FINISHED (a short run sends FINISHED alone)."""
    received: list[protocol.ResultMessage] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(r.phase is Phase.FINISHED for r in received):
        for message in moto.receive_all(queue_url, 1, timeout=2):
            received.append(protocol.open_result(message["Body"], SECRET.encode()))
    return sorted(received, key=lambda r: (r.sent_at, r.phase is Phase.FINISHED))


def sealed(event: InvokeEvent) -> dict[str, Any]:
    # Lambda's runtime hands the handler the parsed JSON payload: the envelope as a dict.
    return json.loads(protocol.seal_event(event, SECRET.encode()))


def run_past_the_deadline(
    event: Any, record: Path, moto_server: Moto, results_queue: str
) -> protocol.ResultMessage:
    """Run a 60 s task with 3 s left and a 1.5 s margin; check the handler stopped its whole tree in time."""
    begin = time.monotonic()
    answer = handler_mod.handler(sealed(event), FakeContext(3.0))
    elapsed = time.monotonic() - begin

    assert answer["status"] == "timeout"
    # Stopped at remaining <= 1.5 s, i.e. ~1.5 s in, plus at most the 1 s SIGTERM grace.
    assert elapsed < 3.0
    # The run outlasted the STARTED grace: STARTED went out while it ran, then the TIMEOUT.
    started, finished = until_finished(moto_server, results_queue)
    assert started.phase is Phase.STARTED
    assert finished.outcome is Outcome.TIMEOUT
    pids = json.loads(record.read_text())
    assert wait_gone(pids["pid"]) and wait_gone(pids["grandchild"])
    return finished


def test_a_run_longer_than_the_grace_reports_started_then_finished(
    results_queue: str,
    moto_server: Moto,
    fake_workload: list[list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(handler_mod.STARTED_GRACE_ENV, "0.2")
    record = tmp_path / "record.json"
    # Long enough for the handler's first scan of the workload's process tree, and past the grace.
    event = make_event(results_queue, {"exit": 0, "record": str(record), "sleep": 0.8})

    before = time.time()
    answer = handler_mod.handler(sealed(event), FakeContext(60))

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


def test_string_event_and_nonzero_exit_is_failed(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]]
) -> None:
    event = make_event(results_queue, {"exit": 3})

    answer = handler_mod.handler(protocol.seal_event(event, SECRET.encode()), FakeContext(60))

    assert answer["status"] == "failed"
    finished = until_finished(moto_server, results_queue)[-1]
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

    finished = run_past_the_deadline(event, record, moto_server, results_queue)
    assert "before the Lambda deadline" in finished.detail


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


def test_a_run_shorter_than_the_grace_reports_finished_alone(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]]
) -> None:
    event = make_event(results_queue, {"exit": 0})

    before = time.time()
    answer = handler_mod.handler(sealed(event), FakeContext(60))

    assert answer["status"] == "success" and len(fake_workload) == 1
    (finished,) = until_finished(moto_server, results_queue)
    assert finished.phase is Phase.FINISHED and finished.outcome is Outcome.SUCCESS
    # The start time the executor records for the run travels in FINISHED.
    assert before <= finished.started_at < finished.sent_at - 0.01
    # Nothing follows: the STARTED held back is cancelled, not sent late.
    time.sleep(handler_mod.DEFAULT_STARTED_GRACE_S)
    assert moto_server.receive_all(results_queue, 1, timeout=1) == []


def test_unsendable_result_raises_so_lambda_fails_the_invocation(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]]
) -> None:
    event = make_event(results_queue + "-does-not-exist", {"exit": 0})

    with pytest.raises(ClientError):
        handler_mod.handler(sealed(event), FakeContext(60))
    assert len(fake_workload) == 1  # a short run learns it at FINISHED


def test_with_no_grace_an_unsendable_started_runs_nothing(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(handler_mod.STARTED_GRACE_ENV, "0")
    event = make_event(results_queue + "-does-not-exist", {"exit": 0})

    with pytest.raises(ClientError):
        handler_mod.handler(sealed(event), FakeContext(60))
    assert fake_workload == []  # STARTED could not be sent: the task was not started either


def test_with_no_grace_started_goes_out_before_a_short_run(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(handler_mod.STARTED_GRACE_ENV, "0")
    handler_mod.handler(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60))
    assert [r.phase for r in until_finished(moto_server, results_queue)] == [Phase.STARTED, Phase.FINISHED]


def test_started_grace_setting(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert handler_mod.started_grace_s({}) == handler_mod.DEFAULT_STARTED_GRACE_S
    assert handler_mod.started_grace_s({handler_mod.STARTED_GRACE_ENV: " 2.5 "}) == 2.5
    for bad in ("soon", "-1", "600"):
        with pytest.raises(handler_mod.HandlerConfigError, match=handler_mod.STARTED_GRACE_ENV):
            handler_mod.started_grace_s({handler_mod.STARTED_GRACE_ENV: bad})
    # Checked before anything runs: a misconfigured function fails the invocation, not the task.
    monkeypatch.setenv(handler_mod.STARTED_GRACE_ENV, "later")
    with pytest.raises(handler_mod.HandlerConfigError, match=handler_mod.STARTED_GRACE_ENV):
        handler_mod.handler(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60))
    assert fake_workload == []


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


@pytest.mark.parametrize("fork", ["true", "false"])
def test_the_real_workload_runner_rejects_an_invalid_workload(
    results_queue: str, moto_server: Moto, monkeypatch: pytest.MonkeyPatch, fork: str
) -> None:
    """No fakes: Airflow's runner (forked, or `execute_workload` in a new process) rejects the workload."""
    monkeypatch.setenv(handler_mod.FORK_ENV, fork)
    monkeypatch.setattr(handler_mod, "_TASK_RUNNER", handler_mod.TaskRunnerLoader())
    event = make_event(results_queue, {"not": "an ExecuteTask workload"})

    answer = handler_mod.handler(sealed(event), FakeContext(120))

    assert answer["status"] == "failed" and answer["return_code"] != 0
    finished = until_finished(moto_server, results_queue)[-1]
    assert finished.outcome is Outcome.FAILED
    assert (handler_mod._TASK_RUNNER.runner is not None) is (fork == "true")


# -- the fork path ---------------------------------------------------------------------------------------


class RecordingRunner:
    """Stands in for Airflow's runner in the forked child: records where it runs, then acts on the spec."""

    imported_in: int | None = None

    def __init__(self) -> None:
        # Set in the sandbox (parent) process: a forked child sees it, a new process would not.
        RecordingRunner.imported_in = os.getpid()

    def run(self, workload_json: str) -> int:
        spec = json.loads(workload_json)
        grandchild = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
        )
        record = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "sid": os.getsid(0),
            "imported_in": RecordingRunner.imported_in,
            "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
            "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            "grandchild": grandchild.pid,
        }
        with open(spec["record"], "w") as out:
            json.dump(record, out)
        print("forked workload output", spec.get("token", ""), flush=True)
        time.sleep(spec.get("sleep", 0))
        return spec.get("exit", 0)


@pytest.fixture
def recording_runner(monkeypatch: pytest.MonkeyPatch) -> handler_mod.TaskRunnerLoader:
    loader = handler_mod.TaskRunnerLoader(factory=RecordingRunner)
    monkeypatch.setattr(handler_mod, "_TASK_RUNNER", loader)
    monkeypatch.delenv(handler_mod.FORK_ENV, raising=False)
    return loader


def test_workload_runs_in_a_child_forked_from_the_sandbox(
    results_queue: str,
    moto_server: Moto,
    recording_runner: handler_mod.TaskRunnerLoader,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"record": str(record), "token": FAKE_TOKEN, "sleep": 0.5, "exit": 4})

    answer = handler_mod.handler(sealed(event), FakeContext(60))

    assert answer == {"status": "failed", "return_code": 4}  # the runner's return code is the exit code
    finished = until_finished(moto_server, results_queue)[-1]
    assert finished.outcome is Outcome.FAILED and finished.return_code == 4
    seen = json.loads(record.read_text())
    # Forked from this process (no exec: the runner imported here is the one that ran), in its own session.
    assert seen["ppid"] == os.getpid() != seen["pid"]
    assert seen["imported_in"] == os.getpid()
    assert seen["sid"] == seen["pid"]
    assert seen["sigterm_default"]
    # Only stdin/stdout/stderr (and the descriptor listing /proc/self/fd itself): no socket or pipe of ours.
    assert len(seen["fds"]) <= 4 and seen["fds"][:3] == [0, 1, 2]
    assert wait_gone(seen["grandchild"])
    out, _ = capfd.readouterr()
    assert "forked workload output <token>" in out
    assert FAKE_TOKEN not in out


def test_forked_workload_is_stopped_with_its_tree_at_the_deadline(
    results_queue: str,
    moto_server: Moto,
    recording_runner: handler_mod.TaskRunnerLoader,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(handler_mod.MARGIN_ENV, "1.5")
    recording_runner.get(lambda: False)  # imported already, as in a warm sandbox
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"record": str(record), "sleep": 60})

    run_past_the_deadline(event, record, moto_server, results_queue)


def test_deadline_during_the_first_import_reports_timeout_and_starts_nothing(
    results_queue: str, moto_server: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    release = threading.Event()
    constructed: list[str] = []

    class SlowImport(RecordingRunner):
        def __init__(self) -> None:
            release.wait(30)
            constructed.append("runner")
            super().__init__()

    loader = handler_mod.TaskRunnerLoader(factory=SlowImport)
    monkeypatch.setattr(handler_mod, "_TASK_RUNNER", loader)
    monkeypatch.setenv(handler_mod.MARGIN_ENV, "1.0")
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"record": str(record)})
    try:
        begin = time.monotonic()
        answer = handler_mod.handler(sealed(event), FakeContext(2.0))
        elapsed = time.monotonic() - begin
    finally:
        release.set()

    assert answer == {"status": "timeout", "return_code": None}
    assert elapsed < 2.0
    finished = until_finished(moto_server, results_queue)[-1]
    assert finished.outcome is Outcome.TIMEOUT
    assert "did not start" in finished.detail
    assert not record.exists()
    # The import goes on in the background: the sandbox's next invocation finds it done.
    assert loader.get(lambda: False) is not None and constructed == ["runner"]


def _command_used_by_both_paths(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The fake command, installed as Airflow's own: the fork path stays eligible and its fallback is seen."""
    calls: list[list[str]] = []

    def build(path: str) -> list[str]:
        command = [sys.executable, "-c", FAKE_WORKLOAD, path]
        calls.append(command)
        return command

    monkeypatch.setattr(handler_mod, "airflow_workload_command", build)
    monkeypatch.setattr(handler_mod, "build_workload_command", build)
    return calls


def test_failed_import_falls_back_to_a_new_process_and_says_so_once(
    results_queue: str, moto_server: Moto, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise ImportError("No module named 'airflow'")

    monkeypatch.setattr(handler_mod, "_TASK_RUNNER", handler_mod.TaskRunnerLoader(factory=broken))
    calls = _command_used_by_both_paths(monkeypatch)

    with caplog.at_level(logging.INFO, logger=handler_mod.log.name):
        first = handler_mod.handler(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60))
        second = handler_mod.handler(sealed(make_event(results_queue, {"exit": 2})), FakeContext(60))

    assert first == {"status": "success", "return_code": 0}
    assert second == {"status": "failed", "return_code": 2}
    assert len(calls) == 2
    assert caplog.text.count("Could not import Airflow's task runner") == 1


def test_fork_can_be_turned_off(
    results_queue: str, moto_server: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = handler_mod.TaskRunnerLoader(factory=RecordingRunner)
    monkeypatch.setattr(handler_mod, "_TASK_RUNNER", loader)
    monkeypatch.setenv(handler_mod.FORK_ENV, "false")
    calls = _command_used_by_both_paths(monkeypatch)

    answer = handler_mod.handler(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60))

    assert answer["status"] == "success" and len(calls) == 1
    assert not loader.settled  # nothing imported


def test_fork_setting_is_checked_before_anything_runs(
    results_queue: str, moto_server: Moto, fake_workload: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert handler_mod.fork_wanted({}) is True
    assert handler_mod.fork_wanted({handler_mod.FORK_ENV: "No"}) is False
    monkeypatch.setenv(handler_mod.FORK_ENV, "sometimes")
    with pytest.raises(handler_mod.HandlerConfigError, match=handler_mod.FORK_ENV):
        handler_mod.handler(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60))
    assert fake_workload == []
    assert moto_server.receive_all(results_queue, 1, timeout=1) == []  # not even STARTED


# Run in a new interpreter: the wake-up installs a signal handler and a fork hook for the whole process.
WAKE_PROBE = r"""
import os, selectors, signal, socket, sys, time
import attrs
from hybrid_router.lambda_exec import handler
from airflow.sdk.execution_time import supervisor

if sys.argv[1] == "wake":
    handler._wake_supervisor_on_child_exit()
ours, theirs = socket.socketpair()
pid = os.fork()
if pid == 0:
    # As Airflow's task process: its sockets close, and only then does it become reapable.
    ours.close()
    child_sigchld_default = signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    theirs.close()
    time.sleep(0.3)
    os._exit(0 if child_sigchld_default else 3)
theirs.close()
# Made as Airflow's supervisor makes it: the attrs default of its `selector` field.
selector = attrs.fields(supervisor.WatchedSubprocess).selector.default.factory()
selector.register(ours, selectors.EVENT_READ)
begin = time.monotonic()
code = None
# Airflow's supervisor loop, reduced: handle EOF, check for exit, wait up to its heartbeat interval again.
while code is None:
    for key, _ in selector.select(timeout=5):
        if not key.fileobj.recv(1):
            selector.unregister(key.fileobj)
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
print(f"{time.monotonic() - begin:.2f} {code}")
"""


@pytest.mark.parametrize("mode", ["wake", "plain"])
def test_supervisor_notices_its_task_process_exit_at_once(mode: str, tmp_path: Path) -> None:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    probe = subprocess.run(
        [sys.executable, "-c", WAKE_PROBE, mode], capture_output=True, text=True, timeout=60, env=env
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    waited, code = probe.stdout.split()
    assert code == "0"  # the task process had SIGCHLD's default disposition back
    if mode == "wake":
        assert float(waited) < 1.5
    else:  # the race this guards against: without the wake-up, the loop sleeps its whole select timeout
        assert float(waited) >= 4.9

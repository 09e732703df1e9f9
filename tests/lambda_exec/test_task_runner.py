"""How the handler starts workloads: forked from a sandbox that imported the task runner once, Airflow's own
runner for real, the fallbacks to a new process, and the supervisor's wake-up on its task process's exit."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hybrid_router.lambda_exec import claim, task_runner
from hybrid_router.lambda_exec.handler import FORK_ENV, MARGIN_ENV, handle
from hybrid_router.lambda_exec.protocol import Outcome
from hybrid_router.lambda_exec.task_runner import TaskRunnerLoader

from .handler_support import (
    FAKE_TOKEN,
    FakeCommand,
    FakeContext,
    SupervisedRunner,
    fake_claim,
    make_event,
    make_sandbox,
    run_past_the_deadline,
    sealed,
    supervised_command,
    until_finished,
    wait_gone,
)

if TYPE_CHECKING:
    from moto_sqs import Moto


@pytest.mark.parametrize("fork", ["true", "false"])
def test_the_real_workload_runner_rejects_an_invalid_workload(
    results_queue: str, moto_server: Moto, fork: str
) -> None:
    """No fakes: Airflow's runner (forked, or `execute_workload` in a new process) rejects the workload."""
    sandbox = make_sandbox({FORK_ENV: fork})
    event = make_event(results_queue, {"not": "an ExecuteTask workload"})

    answer = handle(sealed(event), FakeContext(120), sandbox)

    assert answer["status"] == "failed" and answer["return_code"] != 0
    finished = until_finished(moto_server, results_queue)[-1]
    assert finished.outcome is Outcome.FAILED
    assert sandbox.task_runner is not None
    assert (sandbox.task_runner.runner is not None) is (fork == "true")


class RecordingRunner:
    """Stands in for Airflow's runner in the forked child: records where it runs, then acts on the spec."""

    imported_in: int | None = None

    def __init__(self) -> None:
        # Set in the sandbox (parent) process: a forked child sees it, a new process would not.
        RecordingRunner.imported_in = os.getpid()

    def run(self, workload_json: str) -> int:
        spec = json.loads(workload_json)
        refused = fake_claim(spec)
        if refused is not None:
            return refused
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


def test_workload_runs_in_a_child_forked_from_the_sandbox(
    results_queue: str, moto_server: Moto, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    sandbox = make_sandbox(task_runner=TaskRunnerLoader(factory=RecordingRunner))
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"record": str(record), "token": FAKE_TOKEN, "sleep": 0.5, "exit": 4})

    answer = handle(sealed(event), FakeContext(60), sandbox)

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
    results_queue: str, moto_server: Moto, tmp_path: Path
) -> None:
    loader = TaskRunnerLoader(factory=RecordingRunner)
    loader.get(lambda: False)  # imported already, as in a warm sandbox
    sandbox = make_sandbox({MARGIN_ENV: "1.5"}, task_runner=loader)
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"record": str(record), "sleep": 60})

    run_past_the_deadline(sandbox, event, record, moto_server, results_queue)


@pytest.mark.parametrize("fork", [True, False])
def test_a_deadline_stop_runs_on_kill_and_leaves_the_state_unreported(
    results_queue: str, moto_server: Moto, tmp_path: Path, fork: bool
) -> None:
    """At the deadline the supervisor reports nothing (the router can reset the try), and on_kill still runs."""
    if fork:
        loader = TaskRunnerLoader(factory=SupervisedRunner)
        loader.get(lambda: False)
        sandbox = make_sandbox({MARGIN_ENV: "1.5"}, task_runner=loader)
    else:
        sandbox = make_sandbox({MARGIN_ENV: "1.5", FORK_ENV: "false"}, workload_command=supervised_command)
    files = {name: tmp_path / name for name in ("record", "on_kill", "reported")}
    event = make_event(results_queue, {name: str(path) for name, path in files.items()})

    answer = handle(sealed(event), FakeContext(3.0), sandbox)

    assert answer["status"] == "timeout"
    finished = until_finished(moto_server, results_queue)[-1]
    assert finished.outcome is Outcome.TIMEOUT
    # on_kill ran to its end: its log line to the supervisor did not fail, though nobody read it.
    assert files["on_kill"].read_text() == "on_kill ran"
    # The supervisor reported no state: the task stays RUNNING for the router's conditional reset.
    assert not files["reported"].exists()
    pids = json.loads(files["record"].read_text())
    assert wait_gone(pids["pid"]) and wait_gone(pids["task"])


def test_deadline_during_the_first_import_reports_timeout_and_starts_nothing(
    results_queue: str, moto_server: Moto, tmp_path: Path
) -> None:
    release = threading.Event()
    constructed: list[str] = []

    class SlowImport(RecordingRunner):
        def __init__(self) -> None:
            release.wait(30)
            constructed.append("runner")
            super().__init__()

    loader = TaskRunnerLoader(factory=SlowImport)
    sandbox = make_sandbox({MARGIN_ENV: "1.0"}, task_runner=loader)
    record = tmp_path / "record.json"
    event = make_event(results_queue, {"record": str(record)})
    try:
        begin = time.monotonic()
        answer = handle(sealed(event), FakeContext(2.0), sandbox)
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


def test_failed_import_falls_back_to_a_new_process_and_says_so_once(
    results_queue: str, moto_server: Moto, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise ImportError("No module named 'airflow'")

    # The fake command stands in for Airflow's own: the fork path stays eligible and its fallback is seen.
    command = FakeCommand()
    sandbox = make_sandbox(task_runner=TaskRunnerLoader(factory=broken), workload_command=command)

    with caplog.at_level(logging.INFO, logger=task_runner.log.name):
        first = handle(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60), sandbox)
        second = handle(sealed(make_event(results_queue, {"exit": 2})), FakeContext(60), sandbox)

    assert first == {"status": "success", "return_code": 0}
    assert second == {"status": "failed", "return_code": 2}
    assert len(command.calls) == 2
    assert caplog.text.count("Could not import Airflow's task runner") == 1


def test_fork_can_be_turned_off(results_queue: str, moto_server: Moto) -> None:
    loader = TaskRunnerLoader(factory=RecordingRunner)
    command = FakeCommand()
    sandbox = make_sandbox({FORK_ENV: "false"}, task_runner=loader, workload_command=command)

    answer = handle(sealed(make_event(results_queue, {"exit": 0})), FakeContext(60), sandbox)

    assert answer["status"] == "success" and len(command.calls) == 1
    assert not loader.settled  # nothing imported


# Run in a new interpreter: the wake-up installs a signal handler and a fork hook for the whole process.
WAKE_PROBE = r"""
import os, selectors, signal, socket, sys, time
import attrs
from hybrid_router.lambda_exec import task_runner
from airflow.sdk.execution_time import supervisor

if sys.argv[1] == "wake":
    task_runner._wake_supervisor_on_child_exit()
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


def test_a_forked_run_refused_by_run_reports_not_claimed(
    results_queue: str, moto_server: Moto, tmp_path: Path
) -> None:
    sandbox = make_sandbox(task_runner=TaskRunnerLoader(factory=RecordingRunner))
    event = make_event(results_queue, {"claim": "refused", "record": str(tmp_path / "record.json")})

    answer = handle(sealed(event), FakeContext(60), sandbox)

    assert answer["status"] == Outcome.NOT_CLAIMED.value
    (finished,) = until_finished(moto_server, results_queue)
    assert finished.outcome is Outcome.NOT_CLAIMED and not finished.claimed


class ExecutionApi:
    """A stand-in for Airflow's execution API that answers the supervisor's ``/run`` with ``status`` and its
    heartbeats with ``heartbeat``. The first ``lose_runs`` ``/run`` requests get no answer: the connection is
    closed once the request is read, as when a network loses the answer to a request the server carried out."""

    def __init__(self, status: int, body: dict[str, object], heartbeat: int = 204, lose_runs: int = 0):
        import http.server

        self.requests: list[str] = []
        api = self
        lost = [0]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                if lost[0] < lose_runs:
                    lost[0] += 1
                    api.requests.append(f"{self.command} {self.path} (answer lost)")
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    self.close_connection = True
                    return
                self.answer(status, body)

            def do_PUT(self) -> None:
                self.answer(
                    heartbeat, {"detail": {"reason": "running_elsewhere"}} if heartbeat >= 400 else {}
                )

            def answer(self, status: int, body: dict[str, object]) -> None:
                api.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                payload = json.dumps(body).encode() if status != 204 else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/execution/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def execute_task_workload(tmp_path: Path) -> str:
    """A valid ``ExecuteTask`` workload: Airflow's supervisor calls ``/run`` before the task reads its Dag."""
    import uuid

    return json.dumps(
        {
            "type": "ExecuteTask",
            "token": FAKE_TOKEN,
            "dag_rel_path": "dag.py",
            "bundle_info": {"name": "dags-folder"},
            "log_path": None,
            "ti": {
                "id": str(uuid.uuid4()),
                "task_id": "task",
                "dag_id": "dag",
                "run_id": "run-1",
                "try_number": 1,
                "map_index": -1,
                "dag_version_id": str(uuid.uuid4()),
                "pool_slots": 1,
                "priority_weight": 1,
                "queue": "default",
            },
        }
    )


@pytest.mark.parametrize("fork", ["true", "false"])
def test_the_real_supervisor_refused_by_run_reports_not_claimed(
    results_queue: str, moto_server: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fork: str
) -> None:
    """No fakes but the execution API: Airflow's supervisor (forked, or `execute_workload` in a new process)
    gets 409 from /run, as a duplicate copy of an event does while another run holds the task."""
    api = ExecutionApi(409, {"detail": {"reason": "invalid_state", "previous_state": "running"}})
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", api.url)
    sandbox = make_sandbox({FORK_ENV: fork})
    event = make_event(results_queue, {})
    event = dataclasses.replace(event, workload=execute_task_workload(tmp_path))
    try:
        answer = handle(sealed(event), FakeContext(120), sandbox)
    finally:
        api.close()

    assert any(path.endswith("/run") for path in api.requests)
    assert answer["status"] == Outcome.NOT_CLAIMED.value
    (finished,) = until_finished(moto_server, results_queue)
    assert finished.outcome is Outcome.NOT_CLAIMED and not finished.claimed
    assert sandbox.task_runner is not None
    assert (sandbox.task_runner.runner is not None) is (fork == "true")


RUN_CONTEXT_DAG_RUN = {
    "dag_id": "dag",
    "run_id": "run-1",
    "logical_date": None,
    "data_interval_start": None,
    "data_interval_end": None,
    "run_after": "2026-01-01T00:00:00Z",
    "start_date": None,
    "end_date": None,
    "run_type": "manual",
    "state": "running",
    "consumed_asset_events": [],
    "partition_key": None,
}


@pytest.mark.parametrize(
    ("status", "body", "heartbeat", "recorded"),
    [
        (200, {"max_tries": 0, "dag_run": RUN_CONTEXT_DAG_RUN}, 204, claim.CLAIMED),
        # Another run's /run took the task after ours (two /run at once on SQLite): the heartbeat says so.
        (200, {"max_tries": 0, "dag_run": RUN_CONTEXT_DAG_RUN}, 409, claim.REFUSED),
        # Taken by the server, but the supervisor cannot start the task without the answer's context.
        (200, {"unreadable": True}, 204, claim.STRANDED),
        (409, {"detail": {"reason": "invalid_state", "previous_state": "success"}}, 204, claim.REFUSED),
        (409, {"detail": {"reason": "invalid_state", "previous_state": "running"}}, 204, claim.REFUSED),
        (404, {"detail": "no such task instance"}, 204, None),
    ],
)
def test_the_claim_hook_records_the_answer_to_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    body: dict[str, object],
    heartbeat: int,
    recorded: str | None,
) -> None:
    import uuid
    from datetime import datetime, timezone

    from airflow.sdk.api.client import Client, TaskInstanceOperations

    # Installed on the class (as in the forked child or the new process); put back after the test.
    monkeypatch.setattr(TaskInstanceOperations, "start", TaskInstanceOperations.start)
    path = tmp_path / "claim"
    claim.install_hook(str(path))
    claim.install_hook(str(path))  # twice in one process: still one wrapper
    api = ExecutionApi(status, body, heartbeat)
    try:
        client = Client(base_url=api.url, token=FAKE_TOKEN)
        call = lambda: client.task_instances.start(uuid.uuid4(), 1234, datetime.now(tz=timezone.utc))  # noqa: E731
        if status == 200 and "dag_run" in body and heartbeat == 204:
            call()
        else:
            with pytest.raises(Exception):  # noqa: B017 - Airflow's own errors, passed on unchanged
                call()
    finally:
        api.close()
    # /run, and, once it said yes, the heartbeat that confirms the claim.
    confirmed = status == 200 and "dag_run" in body
    assert [request.split()[0] for request in api.requests] == (["PATCH", "PUT"] if confirmed else ["PATCH"])
    assert (path.read_text() if path.exists() else None) == recorded


@pytest.mark.parametrize(
    ("status", "heartbeat", "recorded", "requests"),
    [
        # What Airflow 3.3 answers a retry from the same process (same host and pid): 200, the task is this run's.
        (200, 204, claim.CLAIMED, ["PATCH", "PATCH", "PUT"]),
        # A server that refuses the retry because the lost attempt took the task: the heartbeat (this pid) gets
        # through, so the run holds the task it could not start.
        (409, 204, claim.STRANDED, ["PATCH", "PATCH", "PUT"]),
        # The lost attempt did not take it (another run did): the heartbeat is refused too.
        (409, 409, claim.REFUSED, ["PATCH", "PATCH", "PUT"]),
    ],
)
def test_a_lost_run_answer_then_a_409_is_settled_by_a_heartbeat(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    heartbeat: int,
    recorded: str,
    requests: list[str],
) -> None:
    import uuid
    from datetime import datetime, timezone

    from airflow.sdk.api.client import Client, TaskInstanceOperations

    monkeypatch.setattr(TaskInstanceOperations, "start", TaskInstanceOperations.start)
    path = tmp_path / "claim"
    claim.install_hook(str(path))
    body = (
        {"max_tries": 0, "dag_run": RUN_CONTEXT_DAG_RUN}
        if status == 200
        else {"detail": {"reason": "invalid_state", "previous_state": "running"}}
    )
    api = ExecutionApi(status, body, heartbeat, lose_runs=1)
    try:
        client = Client(base_url=api.url, token=FAKE_TOKEN)
        call = lambda: client.task_instances.start(uuid.uuid4(), 1234, datetime.now(tz=timezone.utc))  # noqa: E731
        if status == 200:
            call()
        else:
            with pytest.raises(Exception):  # noqa: B017 - Airflow's own errors, passed on unchanged
                call()
    finally:
        api.close()
    assert [request.split()[0] for request in api.requests] == requests
    assert path.read_text() == recorded


def test_a_stranded_run_reports_an_infrastructure_failure_it_holds(
    results_queue: str, moto_server: Moto
) -> None:
    """The run holds the task but never ran it: the executor must hand the try elsewhere at once (no retry
    spent), which a claimed UNREPORTED does; NOT_CLAIMED would leave the task running for nobody."""
    sandbox = make_sandbox({FORK_ENV: "false"}, workload_command=FakeCommand())
    answer = handle(
        sealed(make_event(results_queue, {"claim": "stranded", "exit": 1})), FakeContext(60), sandbox
    )

    assert answer["status"] == Outcome.UNREPORTED.value
    (finished,) = until_finished(moto_server, results_queue)
    assert finished.outcome is Outcome.UNREPORTED and finished.claimed
    assert "its supervisor did not start it" in finished.detail


def test_the_sandbox_imports_ahead_what_each_task_process_would_import_for_itself():
    """The DAG bag (the task process's ``parse``) and the API client's SSL context are made once per sandbox, so
    that a forked task process inherits them instead of paying for them on every run."""
    probe = (
        "import sys\n"
        "from hybrid_router.lambda_exec.task_runner import AirflowTaskRunner\n"
        "assert 'airflow.dag_processing.dagbag' not in sys.modules\n"
        "AirflowTaskRunner()\n"
        "from airflow.sdk.api.client import Client\n"
        "print('airflow.dag_processing.dagbag' in sys.modules, Client._get_ssl_context_cached.cache_info().currsize)\n"
    )
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    # The last line: the client logs that it uses certifi's CAs before.
    assert answer.stdout.splitlines()[-1].split() == ["True", "1"]

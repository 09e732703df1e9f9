"""The function that runs inside AWS Lambda (or the local Lambda service): one Airflow workload per event.

Cold-start budget: at import time this module loads only the standard library and the wire-message module.
boto3 (present in every Lambda Python runtime) is imported on first use, when a result must be sent.

What one invocation does:

1. open the signed event; a malformed or forged event is logged (scrubbed) and nothing runs;
2. an event delivered after its ``not_after`` (late or duplicated delivery) reports ``EVENT_EXPIRED`` and does
   not run, so a task that moved to another executor is never taken back by an old event;
3. report ``STARTED``, then run the workload as Airflow's workers do, in a child process in its own process
   group, its output streamed to the function's log;
4. watch the invocation's own deadline: shortly before Lambda would kill the sandbox, stop the child's group
   and report ``TIMEOUT`` so the executor can fall back at once instead of waiting for the DLQ;
5. report ``FINISHED`` with ``SUCCESS`` or ``FAILED`` and the return code.

A result that cannot be sent (after botocore's own retries) raises, so Lambda marks the invocation failed and
the event reaches the DLQ: the executor then learns about the run from there.

Environment:
- ``HYBRID_ROUTER_SIGNING_SECRET`` (required): the HMAC secret shared with the executor.
- ``HYBRID_ROUTER_DEADLINE_MARGIN_S`` (optional): seconds before the hard deadline at which the workload is
  stopped; default ``min(5, 10% of the time remaining when the invocation starts)``.
- ``AWS_ENDPOINT_URL_SQS`` and the usual AWS variables are read by boto3 itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.protocol import InvokeEvent, Outcome, Phase, ResultMessage

log = logging.getLogger(__name__)
# Lambda's runtime leaves the root logger at WARNING: our progress lines belong in the function's log.
log.setLevel(logging.INFO)

SECRET_ENV = "HYBRID_ROUTER_SIGNING_SECRET"
MARGIN_ENV = "HYBRID_ROUTER_DEADLINE_MARGIN_S"
DEFAULT_MAX_MARGIN_S = 5.0
DEFAULT_MARGIN_FRACTION = 0.10
# Between SIGTERM and SIGKILL at most: Airflow's task runner needs a moment to report its state on SIGTERM.
TERMINATE_GRACE_S = 1.0
POLL_INTERVAL_S = 0.05
# When the workload's process tree is scanned for process groups: soon after start, then every so often.
FIRST_SCAN_S = 0.2
SCAN_INTERVAL_S = 1.0
SEND_MAX_ATTEMPTS = 5


# Lambda gives each execution environment a fresh /tmp, so a HOME below it (see examples/aws/Dockerfile)
# cannot exist in the image: create it once per sandbox, as libraries write caches there.
_home = os.environ.get("HOME", "")
if _home and not os.path.isdir(_home):
    try:
        os.makedirs(_home, exist_ok=True)
    except OSError:  # a read-only HOME is the deployment's problem, not a reason to fail every invocation
        pass


class LambdaContext(Protocol):
    """The parts of Lambda's context object the handler reads."""

    aws_request_id: str
    function_name: str
    log_stream_name: str

    def get_remaining_time_in_millis(self) -> int: ...


class HandlerConfigError(RuntimeError):
    """The function is deployed without a setting it needs; raised so that the invocation fails visibly."""


def handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    """Lambda entry point (``hybrid_router.lambda_exec.handler.handler``)."""
    started_at = time.time()
    secret = _signing_secret()
    try:
        invoke = protocol.open_event(event, secret)
    except protocol.MessageError as exc:
        # The event may hold a token: log only the (token-free) reason, never the event.
        log.error("Rejected an invocation event: %s", protocol.scrub(str(exc)))
        return {"status": "rejected", "reason": protocol.scrub(str(exc))}

    reporter = ResultReporter(invoke, context, secret)
    if time.time() > invoke.not_after:
        log.warning(
            "Event %s for %s arrived after its deadline; not running it",
            invoke.dispatch_id,
            _task_label(invoke),
        )
        reporter.send(
            Phase.FINISHED,
            outcome=Outcome.EVENT_EXPIRED,
            started_at=started_at,
            detail=f"event delivered {time.time() - invoke.not_after:.1f}s after its not_after deadline",
        )
        return {"status": Outcome.EVENT_EXPIRED.value}

    margin_s = deadline_margin_s(context.get_remaining_time_in_millis() / 1000.0)
    reporter.send(Phase.STARTED, started_at=started_at)
    log.info("Running %s (dispatch %s)", _task_label(invoke), invoke.dispatch_id)
    run = run_workload(invoke.workload, context, margin_s)
    if run.timed_out:
        outcome = Outcome.TIMEOUT
        detail = (
            f"stopped by the handler {run.margin_s:.1f}s before the Lambda deadline after "
            f"{run.duration_s:.1f}s (return code {run.return_code})"
        )
    elif run.return_code == 0:
        outcome, detail = Outcome.SUCCESS, ""
    else:
        outcome = Outcome.FAILED
        detail = f"workload exited with return code {run.return_code}"
    log.info("Finished %s: %s %s", _task_label(invoke), outcome.value, detail)
    reporter.send(
        Phase.FINISHED, outcome=outcome, started_at=started_at, return_code=run.return_code, detail=detail
    )
    return {"status": outcome.value, "return_code": run.return_code}


def deadline_margin_s(remaining_s: float, environ: Mapping[str, str] | None = None) -> float:
    """How long before the hard deadline the workload is stopped."""
    environ = os.environ if environ is None else environ
    raw = environ.get(MARGIN_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise HandlerConfigError(f"{MARGIN_ENV}={raw!r}: expected a number of seconds, e.g. 5") from None
        if value < 0:
            raise HandlerConfigError(f"{MARGIN_ENV}={raw!r}: must not be negative")
        return value
    return min(DEFAULT_MAX_MARGIN_S, DEFAULT_MARGIN_FRACTION * max(remaining_s, 0.0))


def build_workload_command(workload_path: str) -> list[str]:
    """The command Airflow's workers run for one workload (the provider's Lambda image does the same)."""
    return [sys.executable, "-m", "airflow.sdk.execution_time.execute_workload", "--json-path", workload_path]


@dataclass(frozen=True)
class WorkloadRun:
    """How the workload's child process ended."""

    return_code: int
    timed_out: bool
    duration_s: float
    margin_s: float


def run_workload(workload: str, context: LambdaContext, margin_s: float) -> WorkloadRun:
    """Run the workload in its own process group; stop it when the invocation's deadline is near."""
    # The workload holds the execution-API token: pass it in a private file, never on the command line
    # (visible in /proc to anyone on the host) and never through the log.
    workdir = tempfile.mkdtemp(prefix="hybrid-router-")
    begin = time.monotonic()
    try:
        path = os.path.join(workdir, "workload.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(workload)
        tree = WorkloadTree(build_workload_command(path))
        timed_out = False
        while tree.running():
            if context.get_remaining_time_in_millis() / 1000.0 <= margin_s:
                timed_out = True
                # Half the margin for the task to react to SIGTERM; the other half to report the timeout.
                tree.stop(grace_s=min(TERMINATE_GRACE_S, margin_s / 2))
                break
            time.sleep(POLL_INTERVAL_S)
        return_code = tree.finish()
        return WorkloadRun(return_code, timed_out, time.monotonic() - begin, margin_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _stream_output(stream: Any) -> None:
    """Copy the child's output to our stdout (Lambda's log stream) as it comes, line by line."""
    out = sys.stdout
    try:
        for raw in iter(stream.readline, b""):
            out.write(protocol.scrub(raw.decode("utf-8", errors="replace"), limit=64_000))
            out.flush()
    except (OSError, ValueError):  # the pipe closed under us when the group was killed
        pass
    finally:
        stream.close()


class WorkloadTree:
    """The workload's process and everything it starts, including processes in other process groups.

    Airflow's supervisor puts the task runner in a process group of its own, so killing the supervisor's
    group alone would leave the task running (and able to report a state after we reported a timeout).
    The groups of all descendants are collected from /proc while the workload runs and all are killed.
    """

    def __init__(self, command: list[str]):
        self.child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.groups = {self.child.pid}
        self._next_scan = time.monotonic() + FIRST_SCAN_S
        self._pump = threading.Thread(
            target=_stream_output, args=(self.child.stdout,), name="workload-output", daemon=True
        )
        self._pump.start()

    def running(self) -> bool:
        if self.child.poll() is not None:
            return False
        if time.monotonic() >= self._next_scan:
            self._next_scan = time.monotonic() + SCAN_INTERVAL_S
            self._scan()
        return True

    def _scan(self) -> list[int]:
        pids = []
        for pid, pgid in _descendants(self.child.pid):
            pids.append(pid)
            self.groups.add(pgid)
        return pids

    def stop(self, grace_s: float) -> None:
        """SIGTERM the workload's group (the supervisor forwards it to the task: on_kill), then kill all."""
        self._scan()
        try:
            os.killpg(self.child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._kill_all()

    def finish(self) -> int:
        """Wait for the workload, then sweep what it left behind; returns its return code."""
        return_code = self.child.wait()
        # Leftovers would hold the output pipe open and, once Lambda freezes the sandbox, wake up inside the
        # next invocation.
        self._kill_all()
        self._pump.join(timeout=2.0)
        return return_code

    def _kill_all(self) -> None:
        pids = self._scan() if self.child.poll() is None else []
        own_group = os.getpgrp()
        for group in self.groups - {own_group}:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _descendants(root: int) -> list[tuple[int, int]]:
    """(pid, process group) of every process below ``root``, read from /proc (Linux, as Lambda is)."""
    children: dict[int, list[tuple[int, int]]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append((int(entry), int(fields[2])))
    found: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        for pid, pgid in children.get(todo.pop(), []):
            found.append((pid, pgid))
            todo.append(pid)
    return found


class ResultReporter:
    """Signs result messages for one event and sends them to its results queue."""

    def __init__(self, invoke: InvokeEvent, context: LambdaContext, secret: bytes):
        self.invoke = invoke
        self.context = context
        self.secret = secret

    def send(
        self,
        phase: Phase,
        *,
        started_at: float,
        outcome: Outcome | None = None,
        return_code: int | None = None,
        detail: str = "",
    ) -> None:
        message = ResultMessage(
            phase=phase,
            dispatch_id=self.invoke.dispatch_id,
            task=self.invoke.task,
            sent_at=time.time(),
            started_at=started_at,
            outcome=outcome,
            return_code=return_code,
            detail=protocol.scrub(detail),
            request_id=getattr(self.context, "aws_request_id", ""),
            function_name=getattr(self.context, "function_name", ""),
            log_stream=getattr(self.context, "log_stream_name", ""),
        )
        body = protocol.seal_result(message, self.secret)
        try:
            _sqs_client().send_message(QueueUrl=self.invoke.results_queue_url, MessageBody=body)
        except Exception as exc:
            # botocore has already retried; failing the invocation sends the event to the DLQ.
            log.error(
                "Could not send the %s result of dispatch %s: %s",
                phase.value,
                self.invoke.dispatch_id,
                protocol.scrub(str(exc)),
            )
            raise


_client_lock = threading.Lock()
_clients: dict[tuple[str, ...], Any] = {}


def _sqs_client() -> Any:
    """One SQS client per sandbox and endpoint settings: warm invocations reuse its connections."""
    key = tuple(
        os.environ.get(name, "")
        for name in ("AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
    )
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            import boto3  # lazily: boto3 costs ~150 ms of import on a cold start
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": SEND_MAX_ATTEMPTS},
                connect_timeout=5,
                read_timeout=10,
            )
            client = boto3.client("sqs", config=config)
            _clients[key] = client
        return client


def _signing_secret() -> bytes:
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise HandlerConfigError(f"{SECRET_ENV} is not set on the function: the handler cannot check events")
    return secret.encode("utf-8")


def _task_label(invoke: InvokeEvent) -> str:
    ref = invoke.task
    return f"{ref.dag_id}.{ref.task_id} run={ref.run_id} try={ref.try_number} map={ref.map_index}"

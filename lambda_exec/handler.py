"""The function that runs inside AWS Lambda (or the local Lambda service): one Airflow workload per event.

Cold-start budget: at import time this module loads only the standard library and the wire-message module.
boto3 (present in every Lambda Python runtime) is imported on first use, when a result must be sent.

What one invocation does:

1. open the signed event; a malformed or forged event is logged (scrubbed) and nothing runs;
2. an event delivered after its ``not_after`` (late or duplicated delivery) reports ``EVENT_EXPIRED`` and does
   not run, so a task that moved to another executor is never taken back by an old event;
3. run the workload as Airflow's LocalExecutor workers do: in a child forked from
   this process, in its own process group, its output streamed to the function's log. Airflow's task-running
   code is imported once per sandbox, on first use, so warm invocations skip the seconds a new Python process
   needs to import it (see "Starting the workload" below);
4. watch the invocation's own deadline: shortly before Lambda would kill the sandbox, stop the child's group
   and report ``TIMEOUT`` so the executor can fall back at once instead of waiting for the DLQ;
5. report ``FINISHED`` with ``SUCCESS`` or ``FAILED``, the return code and the start time.

``STARTED`` is reported only once the run has lasted ``HYBRID_ROUTER_STARTED_GRACE_S`` (see
``StartedNotice``): most short tasks then cost one SQS message instead of two, and the executor takes a
FINISHED with no STARTED before it as both.

A result that cannot be sent (after botocore's own retries) raises, so Lambda marks the invocation failed and
the event reaches the DLQ: the executor then learns about the run from there.

Starting the workload: the first invocation in a sandbox imports Airflow's workload runner in a background
thread (the deadline watch runs meanwhile), then every workload runs in a forked child that parses the
workload, initialises Airflow's logging and ORM settings as ``execute_workload`` does, calls
``BaseExecutor.run_workload`` and leaves with its return code. If fork is unavailable, the import fails, or
``HYBRID_ROUTER_FORK_WORKLOADS`` is ``false``, the workload runs as
``python -m airflow.sdk.execution_time.execute_workload`` in a new process instead (an import failure is
logged once per sandbox). A replaced ``build_workload_command`` (a custom
command) always runs as a new process. If the deadline comes during that first import, the invocation reports
``TIMEOUT`` ("the task did not start") and the import goes on for the sandbox's next invocation. In the child,
Airflow's supervisor is woken by SIGCHLD when its task process exits; without that it may notice the exit only
at its next heartbeat, up to 5 s later (see ``_wake_supervisor_on_child_exit``).

Environment:
- ``HYBRID_ROUTER_SIGNING_SECRET`` (required): the HMAC secret shared with the executor.
- ``HYBRID_ROUTER_DEADLINE_MARGIN_S`` (optional): seconds before the hard deadline at which the workload is
  stopped; default ``min(5, 10% of the time remaining when the invocation starts)``.
- ``HYBRID_ROUTER_FORK_WORKLOADS`` (optional, default ``true``): ``false`` starts every workload as a new
  Python process (slower; for comparison or a runtime where fork misbehaves).
- ``HYBRID_ROUTER_STARTED_GRACE_S`` (optional, default 0.5): how long a run may last before ``STARTED`` is
  sent; ``0`` sends it before the workload starts (and runs nothing if it cannot be sent).
- ``AWS_ENDPOINT_URL_SQS`` and the usual AWS variables are read by boto3 itself.
"""

from __future__ import annotations

import gc
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
FORK_ENV = "HYBRID_ROUTER_FORK_WORKLOADS"
STARTED_GRACE_ENV = "HYBRID_ROUTER_STARTED_GRACE_S"
# A run shorter than this reports FINISHED only (one SQS message instead of two); a longer one reports STARTED
# this late. Well below any heartbeat-based timeout of Airflow's, and below the executor's heartbeat.
DEFAULT_STARTED_GRACE_S = 0.5
MAX_STARTED_GRACE_S = 60.0
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

    # Settings are checked before anything runs: a misconfigured function fails the invocation, not the task.
    margin_s = deadline_margin_s(context.get_remaining_time_in_millis() / 1000.0)
    fork = fork_wanted()
    notice = StartedNotice(reporter, started_at, started_grace_s())
    notice.arm()
    log.info("Running %s (dispatch %s)", _task_label(invoke), invoke.dispatch_id)
    try:
        run = run_workload(invoke.workload, context, margin_s, fork=fork)
    finally:
        # FINISHED never overtakes a STARTED that is being sent; a run that ended within the grace sends none.
        notice.settle()
    if run.timed_out and not run.started:
        outcome = Outcome.TIMEOUT
        detail = (
            f"stopped by the handler {run.margin_s:.1f}s before the Lambda deadline after "
            f"{run.duration_s:.1f}s, still importing Airflow's task runner: the task did not start"
        )
    elif run.timed_out:
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


def started_grace_s(environ: Mapping[str, str] | None = None) -> float:
    """How long STARTED is held back (``HYBRID_ROUTER_STARTED_GRACE_S``, default ``DEFAULT_STARTED_GRACE_S``)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(STARTED_GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_STARTED_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        raise HandlerConfigError(
            f"{STARTED_GRACE_ENV}={raw!r}: expected a number of seconds, e.g. 0.5"
        ) from None
    if not 0 <= value <= MAX_STARTED_GRACE_S:
        raise HandlerConfigError(
            f"{STARTED_GRACE_ENV}={raw!r}: must be between 0 and {MAX_STARTED_GRACE_S:g}"
        )
    return value


class StartedNotice:
    """Reports STARTED once the run has lasted ``grace_s``, so that a short run sends FINISHED alone.

    Each result is one SQS message the executor must receive and delete; FINISHED carries ``started_at``, so
    for a run shorter than the grace STARTED says nothing the executor cannot learn from FINISHED. A longer
    run still reports STARTED (the task becomes RUNNING with its request id while it runs), ``grace_s`` late.
    With ``grace_s == 0`` STARTED is sent at once, before the workload starts, and a failed send raises
    (nothing runs). After the grace a failed send is logged: FINISHED is still tried, and if it fails too the
    invocation fails (and the event reaches the DLQ) as before.
    """

    def __init__(self, reporter: ResultReporter, started_at: float, grace_s: float):
        self._reporter = reporter
        self._started_at = started_at
        self._grace_s = grace_s
        self._cancelled = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = False

    def arm(self) -> None:
        if self._grace_s <= 0:
            self._send()
            return
        self._thread = threading.Thread(target=self._send_after_grace, name="started-notice", daemon=True)
        self._thread.start()

    def settle(self) -> None:
        """The run is over: STARTED is no longer sent, or, if it is being sent, has been sent on return."""
        self._cancelled.set()
        if self._thread is not None:
            self._thread.join()

    def _send_after_grace(self) -> None:
        if self._cancelled.wait(self._grace_s):
            return
        try:
            self._send()
        except Exception:  # logged by the reporter; FINISHED decides whether the invocation fails
            pass

    def _send(self) -> None:
        self._reporter.send(Phase.STARTED, started_at=self._started_at)
        self.sent = True


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


def airflow_workload_command(workload_path: str) -> list[str]:
    """The command Airflow's workers run for one workload (the provider's Lambda image does the same)."""
    return [sys.executable, "-m", "airflow.sdk.execution_time.execute_workload", "--json-path", workload_path]


# Replaceable: a different command (tests, custom images) runs as a new process and turns the fork path off.
build_workload_command = airflow_workload_command


@dataclass(frozen=True)
class WorkloadRun:
    """How the workload's child process ended. ``return_code`` is None when no child was started."""

    return_code: int | None
    timed_out: bool
    duration_s: float
    margin_s: float
    started: bool = True


def run_workload(
    workload: str, context: LambdaContext, margin_s: float, *, fork: bool | None = None
) -> WorkloadRun:
    """Run the workload in its own process group; stop it when the invocation's deadline is near.

    ``fork``: start it in a child forked from this process (default: ``fork_wanted()``).
    """
    begin = time.monotonic()

    def deadline_near() -> bool:
        return context.get_remaining_time_in_millis() / 1000.0 <= margin_s

    runner = None
    if fork is None:
        fork = fork_wanted()
    if fork and build_workload_command is airflow_workload_command:
        runner = _TASK_RUNNER.get(deadline_near)
        if runner is None and not _TASK_RUNNER.settled:
            # The deadline came while Airflow was still being imported: nothing ran, nothing to stop.
            return WorkloadRun(None, True, time.monotonic() - begin, margin_s, started=False)
    workdir = None
    try:
        if runner is not None:
            tree = WorkloadTree(ForkedWorkload(runner, workload))
        else:
            # The workload holds the execution-API token: pass it in a private file, never on the command
            # line (visible in /proc to anyone on the host) and never through the log.
            workdir = tempfile.mkdtemp(prefix="hybrid-router-")
            path = os.path.join(workdir, "workload.json")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(workload)
            tree = WorkloadTree(
                subprocess.Popen(
                    build_workload_command(path),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        timed_out = False
        while tree.running():
            if deadline_near():
                timed_out = True
                # Half the margin for the task to react to SIGTERM; the other half to report the timeout.
                tree.stop(grace_s=min(TERMINATE_GRACE_S, margin_s / 2))
                break
            time.sleep(POLL_INTERVAL_S)
        return_code = tree.finish()
        return WorkloadRun(return_code, timed_out, time.monotonic() - begin, margin_s)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def fork_wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether workloads start in a forked child (``HYBRID_ROUTER_FORK_WORKLOADS``, default true)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(FORK_ENV, "true").strip().lower()
    if raw in ("1", "true", "yes", "on", ""):
        return hasattr(os, "fork")
    if raw in ("0", "false", "no", "off"):
        return False
    raise HandlerConfigError(f"{FORK_ENV}={raw!r}: expected true or false")


class AirflowTaskRunner:
    """Airflow's workload runner, imported into this (sandbox) process; ``run`` runs in forked children."""

    def __init__(self) -> None:
        # Everything a forked child calls is imported here, once, so that no child pays for it.
        from airflow.executors import workloads
        from airflow.executors.base_executor import BaseExecutor
        from airflow.sdk.execution_time import supervisor  # noqa: F401
        from airflow.sdk.log import configure_logging
        from airflow.settings import dispose_orm
        from pydantic import TypeAdapter

        self._decoder = TypeAdapter(workloads.All)
        self._base_executor = BaseExecutor
        self._configure_logging = configure_logging
        self._dispose_orm = dispose_orm

    def run(self, workload_json: str) -> int:
        """In the forked child: what ``execute_workload``'s entry point does, returning the exit code."""
        try:
            workload = self._decoder.validate_json(workload_json)
        except Exception as exc:
            # Written to the child's output, which the handler scrubs of tokens on its way to the log.
            print(f"Failed to parse the workload: {exc}", file=sys.stderr, flush=True)
            return 1
        # The parent's engine and logging were set up for the sandbox: a task process sets up its own, as a
        # new `execute_workload` process would (its connections must not be shared with the parent's).
        self._dispose_orm(do_log=False)
        self._configure_logging(output=sys.stdout.buffer, json_output=True)
        _wake_supervisor_on_child_exit()
        return int(self._base_executor.run_workload(workload, subprocess_logs_to_stdout=True))


def _wake_supervisor_on_child_exit() -> None:
    """Make Airflow's supervisor (this forked child) notice at once when its task process exits.

    The supervisor learns of the exit in its select loop, which waits for socket activity for up to
    ``[workers] min_heartbeat_interval`` (5 s). The task process's sockets close (EOF) a moment before it
    becomes reapable; when the supervisor handles those EOFs inside that moment, nothing is left to wake
    its select and it sleeps the whole 5 s: measured on about half of all runs, each holding the sandbox
    (billed time and a concurrency slot) 5 s after the task's state was reported. SIGCHLD comes after the
    exit, so its wake-up (a self-pipe added to the selector) always finds the process reapable.

    The supervisor builds its selector with ``selectors.DefaultSelector`` (an attrs default bound at import),
    so that class's ``select`` is wrapped, in this child only; its task process forks with SIGCHLD's default
    disposition back and the wrapper turned off.
    """
    import selectors

    global _wake_fd
    selector_class = selectors.DefaultSelector
    if getattr(selector_class.select, "_wakes_on_sigchld", False):
        return
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # the wake-up fd is written for handled signals
    _wake_fd = wake_read
    original_select = selector_class.select

    def select(self: Any, timeout: float | None = None) -> list[Any]:
        wake = _wake_fd
        if wake is None:
            return original_select(self, timeout)
        try:
            self.get_key(wake)
        except KeyError:
            self.register(wake, selectors.EVENT_READ)
        events = []
        for key, mask in original_select(self, timeout):
            if key.fd != wake:
                events.append((key, mask))
                continue
            try:
                while os.read(wake, 512):
                    pass
            except BlockingIOError:
                pass
        return events

    select._wakes_on_sigchld = True  # type: ignore[attr-defined]
    selector_class.select = select  # type: ignore[method-assign]

    def in_task_process() -> None:
        global _wake_fd
        _wake_fd = None
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.close(wake_read)
        os.close(wake_write)

    os.register_at_fork(after_in_child=in_task_process)


_wake_fd: int | None = None


class TaskRunnerLoader:
    """Imports Airflow's workload runner once per sandbox, in a thread, so the deadline stays watched.

    A failed import is logged once, and every later invocation in the sandbox uses a new process instead.
    """

    def __init__(self, factory: Any = AirflowTaskRunner):
        self._factory = factory
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.runner: Any = None
        self.load_s: float | None = None

    @property
    def settled(self) -> bool:
        """True once the import finished, whether or not it worked."""
        return self._done.is_set()

    def get(self, deadline_near: Any) -> Any:
        """The runner, or None if it cannot be had (import failed) or ``deadline_near()`` came first."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="airflow-import", daemon=True)
                self._thread.start()
        while not self._done.wait(POLL_INTERVAL_S):
            if deadline_near():
                log.warning("The deadline came while Airflow's task runner was still being imported")
                return None
        return self.runner

    def _load(self) -> None:
        begin = time.monotonic()
        root = logging.getLogger()
        saved = (list(root.handlers), root.level, log.disabled)
        try:
            self.runner = self._factory()
            self.load_s = time.monotonic() - begin
            # Shared with every forked child, copy-on-write: keep the collector from touching (and so
            # copying) these pages in each child, as Airflow's LocalExecutor does before forking workers.
            gc.freeze()
            log.info(
                "Imported Airflow's task runner in %.2fs: workloads now start in a forked process",
                self.load_s,
            )
        except Exception as exc:
            log.warning(
                "Could not import Airflow's task runner (%s): each workload starts as a new Python process",
                protocol.scrub(str(exc)),
            )
        finally:
            # Importing Airflow configures logging for a component; this process keeps the runtime's set-up.
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            log.disabled = saved[2]
            self._done.set()


_TASK_RUNNER = TaskRunnerLoader()


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


class ForkedWorkload:
    """A workload run by ``runner.run`` in a child forked from this process; the Popen API we use."""

    def __init__(self, runner: Any, workload_json: str):
        read_fd, write_fd = os.pipe()
        # Whatever is buffered would otherwise be written twice, once by each process.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which leaves by os._exit
            _child_main(runner, workload_json, read_fd, write_fd)
        os.close(write_fd)
        self.pid = pid
        self.stdout = os.fdopen(read_fd, "rb")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1  # reaped elsewhere; should not happen
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"forked workload {self.pid}", timeout)
            time.sleep(POLL_INTERVAL_S / 5)
        assert self.returncode is not None
        return self.returncode


def _child_main(runner: Any, workload_json: str, read_fd: int, write_fd: int) -> None:  # pragma: no cover
    """The forked child: a process of its own, as the new process of the fallback path would be."""
    code = 70  # EX_SOFTWARE, if anything below raises
    try:
        os.setsid()
        os.close(read_fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        # As Popen(close_fds=True): the runtime's control pipe and the SQS client's sockets stay the parent's.
        _close_fds_from(3)
        # The runtime may have replaced sys.stdout/stderr (a test's capture, a log shipper): the task writes
        # to descriptors 1 and 2, as a new process would.
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        # The sandbox's signal dispositions are not the task's (a new Python process starts with these).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = runner.run(workload_json)
    except BaseException:
        try:
            import traceback

            sys.stderr.write(protocol.scrub(traceback.format_exc()))
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _close_fds_from(lowest: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(lowest, 65536)
        return
    for fd in fds:
        if fd >= lowest:
            try:
                os.close(fd)
            except OSError:
                pass


class WorkloadTree:
    """The workload's process and everything it starts, including processes in other process groups.

    Airflow's supervisor puts the task runner in a process group of its own, so killing the supervisor's
    group alone would leave the task running (and able to report a state after we reported a timeout).
    The groups of all descendants are collected from /proc while the workload runs and all are killed.
    ``child`` is a ``subprocess.Popen`` or a ``ForkedWorkload`` (both lead their own session).
    """

    def __init__(self, child: Any):
        self.child = child
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

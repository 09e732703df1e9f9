"""How the handler starts a workload: Airflow's task runner, imported once per sandbox, in a forked child;
or a new process.

The first invocation in a sandbox imports Airflow's workload runner in a background thread (the deadline
watch runs meanwhile); then every workload runs as Airflow's LocalExecutor workers run theirs: in a child
forked from the sandbox that parses the workload, initialises Airflow's logging and ORM settings as
``execute_workload`` does, calls ``BaseExecutor.run_workload`` and leaves with its return code. Warm
invocations so skip the seconds a new Python process needs to import Airflow. When fork is turned off, the
import failed (logged once per sandbox) or the sandbox runs a custom command, the workload runs as
``python -m airflow.sdk.execution_time.execute_workload`` (or that command) in a new process instead. If the
deadline comes during the first import, nothing starts and the import goes on for the sandbox's next
invocation.

Either way, the process that runs Airflow's supervisor records whether its ``/run`` claimed the task in the
run's claim file (``claim``): the forked child installs the hook itself; a new process is started as
``python -m hybrid_router.lambda_exec.claim``, which installs it and then runs ``execute_workload``. The file is
named in ``HYBRID_ROUTER_CLAIM_FILE``, so a workload command of one's own can write it too. The run's
processes give Airflow a hostname naming the run (``run_hostname``), so that the execution API never takes
another copy of the event, in a sandbox that looks the same, for this one.

Standard library only at import: Airflow is imported by ``AirflowTaskRunner``, in the loader's thread.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.claim import CLAIM_FILE_ENV, ClaimFile, install_hook
from hybrid_router.lambda_exec.process_tree import POLL_INTERVAL_S, run_until_deadline
from hybrid_router.lambda_exec.run_hostname import BASE_CALLABLE_ENV, RUN_ID_ENV, run_environment

log = logging.getLogger(__name__)
# Set by the handler for each run; never inherited from the sandbox.
RUN_ENV_NAMES = (CLAIM_FILE_ENV, RUN_ID_ENV, BASE_CALLABLE_ENV)
# Lambda's runtime leaves the root logger at WARNING: our progress lines belong in the function's log.
log.setLevel(logging.INFO)


def airflow_workload_command(workload_path: str) -> list[str]:
    """The command Airflow's workers run for one workload (``execute_workload``), with the claim hook installed."""
    return [sys.executable, "-m", "hybrid_router.lambda_exec.claim", "--json-path", workload_path]


@dataclass(frozen=True, kw_only=True)
class WorkloadRun:
    """How the workload's child process ended. ``return_code`` is None when no child was started; ``stopped``
    when the handler stopped it (its deadline, or a STARTED it could not send)."""

    return_code: int | None
    stopped: bool
    duration_s: float
    margin_s: float
    started: bool = True


def run_workload(
    workload: str,
    *,
    deadline_near: Callable[[], bool],
    margin_s: float,
    fork: bool,
    task_runner: TaskRunnerLoader | None,
    command: Callable[[str], list[str]] = airflow_workload_command,
    claim: ClaimFile | None = None,
    run_id: str | None = None,
) -> WorkloadRun:
    """Run the workload in its own process group; stop its whole tree once ``deadline_near()`` (the deadline,
    or another reason the handler has to stop the run).

    With ``fork`` and a ``task_runner`` it runs in a child forked from this process; otherwise, or if
    Airflow's task runner cannot be imported, ``command`` starts it as a new process. The run's ``/run`` answer
    goes to ``claim`` (whose folder also holds the workload's file for a new process); ``run_id`` is in the
    environment of the workload's processes, as ``HYBRID_ROUTER_RUN_ID``, and in the hostname they give
    Airflow.
    """
    begin = time.monotonic()
    runner = None
    if fork and task_runner is not None:
        runner = task_runner.get(deadline_near)
        if runner is None and not task_runner.settled:
            # Stopped while Airflow was still being imported: nothing ran, nothing to stop.
            return WorkloadRun(
                return_code=None,
                stopped=True,
                duration_s=time.monotonic() - begin,
                margin_s=margin_s,
                started=False,
            )
    workdir = None
    run_env = {CLAIM_FILE_ENV: claim.path} if claim is not None else {}
    if run_id:
        # A hostname of the run's own: the execution API must not take another run for this one.
        run_env[RUN_ID_ENV] = run_id
        run_env.update(run_environment(os.environ))
    try:
        if runner is not None:
            child: Any = ForkedWorkload(runner, workload, run_env)
        else:
            if claim is None:
                workdir = tempfile.mkdtemp(prefix="hybrid-router-")
            folder = workdir if claim is None else claim.folder
            child = _start_process(command, workload, folder, run_env)
        return_code, stopped = run_until_deadline(child, deadline_near=deadline_near, margin_s=margin_s)
        return WorkloadRun(
            return_code=return_code,
            stopped=stopped,
            duration_s=time.monotonic() - begin,
            margin_s=margin_s,
        )
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _start_process(
    command: Callable[[str], list[str]], workload: str, workdir: str, run_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``command`` in a session of its own, the workload handed over in a file in ``workdir``."""
    # The workload holds the execution-API token: pass it in a private file, never on the command line
    # (visible in /proc to anyone on the host) and never through the log.
    path = os.path.join(workdir, "workload.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(workload)
    env = {name: value for name, value in os.environ.items() if name not in RUN_ENV_NAMES}
    env.update(run_env or {})
    return subprocess.Popen(
        command(path),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


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

        _import_what_the_task_process_imports()
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
        install_hook()  # the claim file named by the handler (``_child_main``)
        return int(self._base_executor.run_workload(workload, subprocess_logs_to_stdout=True))


def _import_what_the_task_process_imports() -> None:
    """Import what each forked task process would otherwise import for itself, and build what it builds.

    Measured with py-spy in warm sandboxes running no-op tasks: half of a run's CPU went to the task process's
    own import of the DAG bag (``parse``: ``dagbag``, ``serialized_objects``, the ORM models) and a tenth to the
    supervisor's API client loading the CA certificates into a new SSL context; a LocalExecutor worker forked
    from the scheduler finds both done. Best effort: a name Airflow moves only costs the time again.
    """
    try:
        from airflow.dag_processing.dagbag import BundleDagBag  # noqa: F401
    except ImportError:  # pragma: no cover - an Airflow that parses elsewhere
        log.info("Airflow's DAG bag could not be imported ahead; each task process imports it")
    try:
        from airflow.sdk.api.client import API_SSL_CA_FILE_PATH, API_SSL_CERT_PATH, Client

        # Cached per process: the forked supervisors reuse it instead of loading the certificates each time.
        Client._get_ssl_context_cached(API_SSL_CA_FILE_PATH, API_SSL_CERT_PATH)
    except (ImportError, AttributeError, OSError) as exc:  # pragma: no cover - a changed or unusual client
        log.info("The execution API client's SSL context was not built ahead: %s", exc)


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

    selector_class = selectors.DefaultSelector
    if getattr(selector_class.select, "_wakes_on_sigchld", False):
        return
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # the wake-up fd is written for handled signals
    wake_fd: int | None = wake_read
    original_select = selector_class.select

    def select(self: Any, timeout: float | None = None) -> list[Any]:
        wake = wake_fd
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
        nonlocal wake_fd
        wake_fd = None
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.close(wake_read)
        os.close(wake_write)

    os.register_at_fork(after_in_child=in_task_process)


class TaskRunnerLoader:
    """Imports Airflow's workload runner once per sandbox, in a thread, so the deadline stays watched.

    A failed import is logged once, and every later invocation in the sandbox uses a new process instead.
    """

    def __init__(self, factory: Callable[[], Any] = AirflowTaskRunner):
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

    def get(self, deadline_near: Callable[[], bool]) -> Any:
        """The runner, or None if it cannot be had (import failed) or ``deadline_near()`` came first (the
        deadline, or another reason to stop the run)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="airflow-import", daemon=True)
                self._thread.start()
        while not self._done.wait(POLL_INTERVAL_S):
            if deadline_near():
                log.warning("The run was stopped while Airflow's task runner was still being imported")
                return None
        return self.runner

    def _load(self) -> None:
        begin = time.monotonic()
        root = logging.getLogger()
        # Importing Airflow configures logging for a component; this process keeps the runtime's set-up and
        # the handler's own loggers as they were.
        ours = [
            logger
            for name, logger in logging.root.manager.loggerDict.copy().items()
            if name.startswith("hybrid_router.") and isinstance(logger, logging.Logger)
        ]
        saved = (list(root.handlers), root.level, [(logger, logger.disabled) for logger in ours])
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
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            for logger, disabled in saved[2]:
                logger.disabled = disabled
            self._done.set()


class ForkedWorkload:
    """A workload run by ``runner.run`` in a child forked from this process; the Popen API we use."""

    def __init__(self, runner: Any, workload_json: str, run_env: dict[str, str] | None = None):
        read_fd, write_fd = os.pipe()
        # Whatever is buffered would otherwise be written twice, once by each process.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which leaves by os._exit
            _child_main(runner, workload_json, read_fd, write_fd, run_env or {})
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


def _child_main(
    runner: Any, workload_json: str, read_fd: int, write_fd: int, run_env: dict[str, str]
) -> None:  # pragma: no cover
    """The forked child: a process of its own, as the new process of the fallback path would be."""
    code = 70  # EX_SOFTWARE, if anything below raises
    try:
        os.setsid()
        # Where the runner records its /run answer (``claim.install_hook``) and the run's id, as a new process
        # learns them.
        for name in RUN_ENV_NAMES:
            os.environ.pop(name, None)
        os.environ.update(run_env)
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

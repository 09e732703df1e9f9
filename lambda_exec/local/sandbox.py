"""Warm sandboxes: one long-lived runtime process per concurrent execution of a function, as Lambda keeps them.

A sandbox is started once (a cold start: a Python start-up and the handler's import) and then runs one
invocation at a time over a pipe, so a warm no-op invocation costs a pipe round trip. Each sandbox runs in its own
process group with the function's environment, and its output goes to its own log stream file, where the
service also writes Lambda's ``START`` / ``END`` / ``REPORT`` lines.

Limits are enforced from outside, as Lambda does: at the function's timeout the whole process tree is killed
(``Sandbox.Timedout``); a watchdog samples the tree's memory and kills it above the function's memory size
(``Runtime.OutOfMemory``). The memory is counted as Lambda counts it, with the measure the handler reports its
own peak with (``tree_memory``): the ``REPORT`` line's ``Max Memory Used`` is the peak of the same samples. A
sandbox that was killed or crashed is discarded; the next invocation is cold.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from hybrid_router.lambda_exec.local.config import FunctionConfig
from hybrid_router.lambda_exec.protocol import RunUsage
from hybrid_router.lambda_exec.tree_memory import TreeMemory, run_usage

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Lambda gives a function's initialisation at most 10 s of its own (outside the invocation's timeout).
INIT_TIMEOUT_S = 10.0
WATCH_INTERVAL_S = 0.1


class Ending(str, enum.Enum):
    """How one invocation ended, from the service's side."""

    SUCCESS = "success"
    HANDLED_ERROR = "handled_error"  # the handler raised: Lambda's "Unhandled" function error
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    CRASH = "crash"  # the runtime process exited or was killed otherwise
    INIT_ERROR = "init_error"


@dataclass
class InvocationResult:
    ending: Ending
    payload: str | None = None  # the handler's return value as JSON text, on success
    error: dict[str, Any] = field(default_factory=dict)  # errorMessage / errorType, on failure
    usage: RunUsage | None = None  # the REPORT line's figures, once the invocation has ended
    init_ms: float | None = None  # set on a cold start
    log_tail: bytes = b""  # the end of this invocation's log lines (for X-Amz-Log-Type: Tail)

    @property
    def failed(self) -> bool:
        return self.ending is not Ending.SUCCESS


def new_log_stream_name(now: float | None = None) -> str:
    """A CloudWatch-style stream name: ``YYYY/MM/DD/[$LATEST]<32 hex digits>``."""
    day = time.strftime("%Y/%m/%d", time.gmtime(now))
    return f"{day}/[$LATEST]{secrets.token_hex(16)}"


def log_stream_path(log_dir: str | Path, function_name: str, stream_name: str) -> Path:
    """The file that holds one log stream: ``<log_dir>/<function>/<stream with '/' as '-'>.log``."""
    return Path(log_dir) / function_name / (stream_name.replace("/", "-") + ".log")


class Sandbox:
    """One execution environment of a function. Not thread-safe: one invocation at a time, by design."""

    def __init__(
        self,
        function: FunctionConfig,
        base_env: Mapping[str, str],
        log_dir: str | Path,
        function_arn: str,
        region: str,
    ):
        self.function = function
        self.function_arn = function_arn
        self.stream_name = new_log_stream_name()
        self.log_path = log_stream_path(log_dir, function.name, self.stream_name)
        self._env = self._build_env(base_env, region)
        self._proc: subprocess.Popen[bytes] | None = None
        self._control_out = -1  # our end: requests to the runtime
        self._control_in = -1  # our end: replies from the runtime
        self._buffer = b""
        self._lock = threading.Lock()
        self._memory: TreeMemory | None = None
        # The watchdog samples while the invocation's own thread starts a new peak and reads it at the end.
        self._memory_lock = threading.Lock()
        self.kill_reason: Ending | None = None
        self.busy = False
        self.last_used = time.monotonic()
        self.init_ms: float | None = None

    # -- life cycle ---------------------------------------------------------------------------------------

    def _build_env(self, base_env: Mapping[str, str], region: str) -> dict[str, str]:
        fn = self.function
        env = {**base_env, **fn.environment}
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_NAME": fn.name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(fn.memory_mb),
                "AWS_LAMBDA_FUNCTION_TIMEOUT": str(int(fn.timeout_s)),
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{fn.name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": self.stream_name,
                "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
                "_HANDLER": fn.handler,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.setdefault("AWS_REGION", region)
        env.setdefault("AWS_DEFAULT_REGION", region)
        if fn.code_path:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (fn.code_path, env.get("PYTHONPATH", "")) if p)
        return env

    def start(self) -> InvocationResult | None:
        """Start the runtime and wait for its handler import. Returns an INIT_ERROR result if that failed."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        begin = time.perf_counter()
        with open(self.log_path, "ab") as stream:
            try:
                self._proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "hybrid_router.lambda_exec.local.runtime",
                        "--control-in",
                        str(request_read),
                        "--control-out",
                        str(reply_write),
                        "--handler",
                        self.function.handler,
                    ],
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                    pass_fds=(request_read, reply_write),
                    start_new_session=True,
                    cwd=self.function.code_path or None,
                )
            finally:
                os.close(request_read)
                os.close(reply_write)
        self._control_out, self._control_in = request_write, reply_read
        self._memory = TreeMemory(self._proc.pid)
        try:
            ready = self._read_message(time.monotonic() + INIT_TIMEOUT_S)
        except TimeoutError:
            self.discard(Ending.TIMEOUT)
            return InvocationResult(
                Ending.INIT_ERROR,
                error={"errorType": "Runtime.InitTimeout", "errorMessage": "Init timed out"},
            )
        self.init_ms = (time.perf_counter() - begin) * 1000
        if ready is None or ready.get("type") != "ready":
            self.discard(Ending.CRASH)
            error = (ready or {}).get("error") or {
                "errorType": "Runtime.ExitError",
                "errorMessage": f"Runtime exited during init: {self._exit_description()}",
            }
            return InvocationResult(Ending.INIT_ERROR, error=error, init_ms=self.init_ms)
        return None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self.kill_reason is None

    def kill(self, reason: Ending) -> None:
        """Kill the sandbox's whole process tree, including children that left its process group."""
        with self._lock:
            if self.kill_reason is None:
                self.kill_reason = reason
            proc = self._proc
        if proc is None:
            return
        kill_tree(proc.pid)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait for anyone
            log.error("Sandbox %s (pid %s) did not die after SIGKILL", self.stream_name, proc.pid)

    def discard(self, reason: Ending) -> None:
        """Kill the sandbox and release its pipes. Only the thread that owns the sandbox calls this."""
        self.kill(reason)
        for fd in (self._control_out, self._control_in):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._control_out = self._control_in = -1

    # -- one invocation -----------------------------------------------------------------------------------

    def invoke(self, request_id: str, payload: str, timeout_s: float, cold: bool = False) -> InvocationResult:
        """Run one invocation; the sandbox is dead afterwards unless the result is SUCCESS or HANDLED_ERROR.

        ``cold``: the first invocation after start; its REPORT line carries the init duration.
        """
        fn = self.function
        log_offset = self._log_size()
        self.write_log(f"START RequestId: {request_id} Version: $LATEST\n")
        begin = time.monotonic()
        deadline = time.time() + timeout_s
        with self._memory_lock:
            self._memory.reset()
        with self._lock:
            self.busy = True
        request = {
            "request_id": request_id,
            "payload": payload,
            "deadline": deadline,
            "function_arn": self.function_arn,
        }
        try:
            _write_all(self._control_out, json.dumps(request).encode("utf-8") + b"\n")
            reply = self._read_message(begin + timeout_s)
        except TimeoutError:
            self.kill(Ending.TIMEOUT)
            reply = None
        except OSError:  # the runtime died and closed its end
            reply = None
        duration_ms = (time.monotonic() - begin) * 1000
        with self._memory_lock:
            self._memory.sample(final=True)
            peak = self._memory.peak
        with self._lock:
            self.busy = False
        self.last_used = time.monotonic()
        result = self._interpret(reply, timeout_s)
        if result.ending is Ending.OUT_OF_MEMORY:
            peak = fn.memory_mb * MIB  # Lambda's report of a sandbox it killed for memory
        result.usage = run_usage(duration_ms, peak, fn.memory_mb)
        result.init_ms = self.init_ms if cold else None
        self._write_report(request_id, result)
        result.log_tail = self._read_log_tail(log_offset)
        return result

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _read_log_tail(self, since: int, limit: int = 4096) -> bytes:
        try:
            with open(self.log_path, "rb") as stream:
                end = stream.seek(0, os.SEEK_END)
                stream.seek(max(since, end - limit))
                return stream.read()
        except OSError:
            return b""

    def _interpret(self, reply: dict[str, Any] | None, timeout_s: float) -> InvocationResult:
        if reply is not None and reply.get("type") == "result":
            return InvocationResult(Ending.SUCCESS, payload=reply.get("payload"))
        if reply is not None and reply.get("type") == "error":
            return InvocationResult(Ending.HANDLED_ERROR, error=reply.get("error") or {})
        # No reply: we killed it, or it died by itself. Either way this sandbox is finished.
        self.discard(Ending.CRASH)  # keeps an earlier reason (timeout, out of memory)
        if self.kill_reason is Ending.TIMEOUT:
            message = f"Task timed out after {timeout_s:.2f} seconds"
            return InvocationResult(
                Ending.TIMEOUT, error={"errorType": "Sandbox.Timedout", "errorMessage": message}
            )
        if self.kill_reason is Ending.OUT_OF_MEMORY:
            return InvocationResult(
                Ending.OUT_OF_MEMORY,
                error={
                    "errorType": "Runtime.OutOfMemory",
                    "errorMessage": "Runtime exited with error: signal: killed",
                },
            )
        return InvocationResult(
            Ending.CRASH,
            error={
                "errorType": "Runtime.ExitError",
                "errorMessage": f"Runtime exited with error: {self._exit_description()}",
            },
        )

    def _exit_description(self) -> str:
        code = self._proc.poll() if self._proc else None
        if code is None:
            return "unknown"
        if code < 0:
            try:
                name = signal.Signals(-code).name.removeprefix("SIG").lower()
            except ValueError:
                name = str(-code)
            return f"signal: {name}"
        return f"exit status {code}"

    def _write_report(self, request_id: str, result: InvocationResult) -> None:
        fn = self.function
        lines = []
        if result.ending is Ending.TIMEOUT:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            lines.append(f"{stamp}Z {request_id} {result.error['errorMessage']}\n")
        elif result.ending in (Ending.OUT_OF_MEMORY, Ending.CRASH):
            lines.append(f"RequestId: {request_id} Error: {result.error['errorMessage']}\n")
        lines.append(f"END RequestId: {request_id}\n")
        usage = result.usage
        assert usage is not None  # set by invoke() before the report
        report = (
            f"REPORT RequestId: {request_id}\tDuration: {usage.duration_ms:.2f} ms\t"
            f"Billed Duration: {usage.billed_duration_ms} ms\tMemory Size: {fn.memory_mb} MB\t"
            f"Max Memory Used: {usage.peak_memory_mb} MB"
        )
        if result.init_ms is not None:
            report += f"\tInit Duration: {result.init_ms:.2f} ms"
        if result.ending not in (Ending.SUCCESS, Ending.HANDLED_ERROR):
            report += f"\tStatus: error\tError Type: {result.error.get('errorType', '')}"
        lines.append(report + "\n")
        self.write_log("".join(lines))

    def write_log(self, text: str) -> None:
        # O_APPEND: our lines and the runtime's output interleave whole, as two writers of one stream.
        with open(self.log_path, "a", encoding="utf-8") as stream:
            stream.write(text)

    # -- memory -------------------------------------------------------------------------------------------

    def watch_tick(self) -> None:
        """One watchdog sample: kill the tree when it uses more memory than the function has."""
        if not self.busy or self.kill_reason is not None or self._memory is None:
            return
        with self._memory_lock:
            used = self._memory.sample()
        limit = self.function.memory_mb * MIB
        if used is not None and used > limit and self.busy:
            log.info(
                "Sandbox %s of %s uses %d MB > %d MB: killing it",
                self.stream_name,
                self.function.name,
                used // MIB,
                self.function.memory_mb,
            )
            self.kill(Ending.OUT_OF_MEMORY)

    # -- pipe ---------------------------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON line from the runtime; None at end of file; TimeoutError at the deadline."""
        parts = [self._buffer]
        # A newline can only be in the newest part: the earlier ones were searched already.
        while b"\n" not in parts[-1]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._buffer = b"".join(parts)
                raise TimeoutError
            fd = self._control_in
            if fd < 0:
                return None
            # poll, not select: descriptor numbers pass FD_SETSIZE when many sandboxes and connections are open.
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            try:
                if not poller.poll(min(remaining, 0.5) * 1000):
                    continue
                chunk = os.read(fd, 1 << 16)
            except OSError:
                return None
            if not chunk:
                return None
            parts.append(chunk)
        line, self._buffer = b"".join(parts).split(b"\n", 1)
        return json.loads(line)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def kill_tree(root_pid: int) -> None:
    """SIGKILL a process, its process group, and every descendant (and their groups), whatever their session."""
    own_group = os.getpgrp()
    try:
        descendants = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    groups = {root_pid}
    for child in descendants:
        try:
            groups.add(os.getpgid(child.pid))
        except OSError:
            continue
    groups.discard(own_group)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:
            pass


class MemoryWatchdog:
    """Samples every busy sandbox's memory every ``interval_s`` in one thread."""

    def __init__(self, interval_s: float = WATCH_INTERVAL_S):
        self.interval_s = interval_s
        self._sandboxes: set[Sandbox] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def watch(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._sandboxes.add(sandbox)

    def forget(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._sandboxes.discard(sandbox)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                sandboxes = list(self._sandboxes)
            for sandbox in sandboxes:
                try:
                    sandbox.watch_tick()
                except Exception:  # one broken sample must not stop the watch over the others
                    log.exception("Memory watchdog failed on sandbox %s", sandbox.stream_name)

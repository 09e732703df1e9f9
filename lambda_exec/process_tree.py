"""Watching a workload's process tree inside the Lambda sandbox, and stopping all of it at the deadline.

Standard library only: the handler imports this module on every cold start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from hybrid_router.lambda_exec import protocol

# Between SIGTERM and SIGKILL at most: Airflow's task runner needs a moment to report its state on SIGTERM.
TERMINATE_GRACE_S = 1.0
# How often the deadline is checked while the workload runs (or while Airflow's task runner is imported).
POLL_INTERVAL_S = 0.05
# When the workload's process tree is scanned for process groups: soon after start, then every so often.
FIRST_SCAN_S = 0.2
SCAN_INTERVAL_S = 1.0


class WorkloadProcess(Protocol):
    """The part of ``subprocess.Popen`` the tree uses; a ``ForkedWorkload`` offers the same."""

    pid: int
    stdout: Any  # a binary pipe carrying the workload's stdout and stderr

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def run_until_deadline(
    child: WorkloadProcess, *, deadline_near: Callable[[], bool], margin_s: float
) -> tuple[int, bool]:
    """Wait for ``child``'s tree to end, or stop all of it once ``deadline_near()``.

    Returns the child's return code and whether the deadline stopped it.
    """
    tree = WorkloadTree(child)
    timed_out = False
    while tree.running():
        if deadline_near():
            timed_out = True
            # Half the margin for the task to react to SIGTERM; the other half to report the timeout.
            tree.stop(grace_s=min(TERMINATE_GRACE_S, margin_s / 2))
            break
        time.sleep(POLL_INTERVAL_S)
    return tree.finish(), timed_out


class WorkloadTree:
    """The workload's process and everything it starts, including processes in other process groups.

    Airflow's supervisor puts the task runner in a process group of its own, so killing the supervisor's
    group alone would leave the task running (and able to report a state after we reported a timeout).
    The groups of all descendants are collected from /proc while the workload runs and all are killed.
    ``child`` leads its own session.
    """

    def __init__(self, child: WorkloadProcess):
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


def _stream_output(stream: IO[bytes]) -> None:
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

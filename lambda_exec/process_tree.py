"""Watching a workload's process tree inside the Lambda sandbox, and stopping all of it at the deadline.

Standard library only: the handler imports this module on every cold start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from hybrid_router.lambda_exec import protocol

# Between SIGTERM and SIGKILL at most: the time the operator's on_kill gets to clean up.
TERMINATE_GRACE_S = 1.0
# How long the workload's own process may take to stop on SIGSTOP (it stops before it runs any more of its
# code: microseconds, unless the machine is starved); killed outright after that.
FREEZE_TIMEOUT_S = 0.5
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
    """Wait for ``child``'s tree to end, or stop all of it once ``deadline_near()`` (the deadline, or another
    reason the handler has to stop the run).

    Returns the child's return code and whether it was stopped.
    """
    tree = WorkloadTree(child)
    stopped = False
    while tree.running():
        if deadline_near():
            stopped = True
            # Half the margin for the task's on_kill; the other half to report the timeout.
            tree.stop(grace_s=min(TERMINATE_GRACE_S, margin_s / 2))
            break
        time.sleep(POLL_INTERVAL_S)
    return tree.finish(), stopped


class WorkloadTree:
    """The workload's process and everything it starts, including processes in other process groups.

    ``child`` (Airflow's supervisor) leads its own session and puts the task process in a process group of its
    own, and a BashOperator's command has a session of its own: killing the supervisor's group alone would leave
    them running. The groups of all descendants are collected from /proc while the workload runs and all are
    killed.
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

    def _scan(self) -> list[tuple[int, int, int]]:
        """(pid, parent pid, process group) of every process below ``child``; their groups are remembered."""
        found = descendants(self.child.pid)
        self.groups.update(pgid for _, _, pgid in found)
        return found

    def stop(self, grace_s: float) -> None:
        """Stop the workload so that nothing reports a state for it any more, with the task's on_kill run.

        ``child`` is Airflow's supervisor: the only process of the tree that talks to the execution API (its
        task process reaches the API only through it, over a socket pair). So:

        1. freeze the supervisor (SIGSTOP): from then on nothing reports a state for this try, the task stays
           RUNNING, and the executor's timeout report lets the router reset it and run it on the fallback;
        2. SIGTERM the supervisor's children, the task processes: Airflow's task runner calls the operator's
           on_kill. Its log lines and its FAILED go into sockets that nobody reads any more;
        3. once they are gone, or after ``grace_s``, SIGKILL every process group of the tree, the supervisor's
           included.
        """
        # Fence the reporter: no reset can take back a FAILED that callbacks and downstream tasks already saw.
        # Frozen, not killed: a dead supervisor closes the task's sockets, and on_kill fails at its first log
        # line (BrokenPipeError; BashOperator's logs before it signals its command).
        leader = self.child.pid
        try:
            os.kill(leader, signal.SIGSTOP)
        except ProcessLookupError:
            pass
        if not _wait_for(lambda: _state(leader) in _STOPPED_OR_GONE, FREEZE_TIMEOUT_S):
            try:
                os.kill(leader, signal.SIGKILL)  # fenced all the same; on_kill may then fail as it logs
            except ProcessLookupError:
                pass
        tasks = [pid for pid, parent, _ in self._scan() if parent == leader]
        for pid in tasks:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # A task process that reports after on_kill waits for the frozen supervisor's answer until killed.
        _wait_for(lambda: all(_state(pid) in _GONE for pid in tasks), grace_s)
        self._kill_all()
        try:
            # Stopped before it led a group of its own (setsid), it is in none of the groups just killed; our
            # child, unreaped, its pid cannot have been reused.
            os.kill(leader, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self) -> int:
        """Wait for the workload, then sweep what it left behind; returns its return code."""
        return_code = self.child.wait()
        # Leftovers would hold the output pipe open and, once Lambda freezes the sandbox, wake up inside the
        # next invocation.
        self._kill_all()
        self._pump.join(timeout=2.0)
        return return_code

    def _kill_all(self) -> None:
        pids = [pid for pid, _, _ in self._scan()] if self.child.poll() is None else []
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


# Process states in /proc/<pid>/stat: zombie or dead (a stopped supervisor cannot reap its task process), and
# stopped; "" when the process does not exist.
_GONE = frozenset({"Z", "X", ""})
_STOPPED_OR_GONE = _GONE | {"T"}


def _state(pid: int) -> str:
    """The state letter of ``pid`` in /proc, or "" if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S / 5)
    return True


def descendants(root: int) -> list[tuple[int, int, int]]:
    """(pid, parent, process group) of every process below ``root``, from /proc (Linux, as Lambda is)."""
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
    found: list[tuple[int, int, int]] = []
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, pgid in children.get(parent, []):
            found.append((pid, parent, pgid))
            todo.append(pid)
    return found

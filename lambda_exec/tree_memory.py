"""The memory of a Lambda sandbox, counted as Lambda counts it, and the ``REPORT`` figures of one run.

One measure serves both places that need it: the handler reports its run's peak in its final result
(``RunMeter``), and the local Lambda service enforces the function's memory size and writes its ``REPORT`` line
with it (``local/sandbox.py``). What counts is every process of the sandbox's process tree, a page shared
between them counted once: Airflow's supervisor forks the task runner, and the two share most of their pages.

Each process's proportional set size (Pss: a shared page split between the processes that map it) summed over
the tree counts a page shared inside the tree once. Reading it makes the kernel walk the process's page tables
(1-2 ms for a process that imported Airflow), reading the resident size costs microseconds. So Pss is read only
when the resident sum, which is never below the Pss sum, says a new peak is possible, at most every
``PSS_INTERVAL_S``, and only for the processes whose resident size changed since their last reading (the others
are taken to have kept their Pss, unless a process of the tree appeared or ended since: then its sharers' Pss
changed too, and every process is read again). Finding the tree's processes scans all of /proc, every ``TREE_REFRESH_S``.

Standard library only (/proc, Linux, as Lambda is): the handler imports this module on every cold start.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

from hybrid_router.lambda_exec.process_tree import descendants
from hybrid_router.lambda_exec.protocol import RunUsage

MIB = 1024 * 1024
# How often the handler measures its tree (the local service's watchdog samples as often).
SAMPLE_INTERVAL_S = 0.1
# Reading Pss is what a sample costs (a quarter of a warm sandbox's CPU for a no-op task, py-spy), but a longer
# interval misses the peak of a run shorter than it.
PSS_INTERVAL_S = 0.3
TREE_REFRESH_S = 0.5
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class TreeMemory:
    """The memory used by ``root_pid`` and every process below it, and its peak since the last ``reset``.

    Not thread-safe: one thread samples at a time (the local service's watchdog, the handler's deadline watch).
    """

    def __init__(self, root_pid: int, *, clock: Callable[[], float] = time.monotonic):
        self.root_pid = root_pid
        self.peak = 0  # bytes
        self._clock = clock
        self._pids = [root_pid]
        self._next_pss = self._next_tree = 0.0
        self._pss: dict[int, tuple[int, int]] = {}  # pid -> (its resident size, its Pss) when Pss was read

    def reset(self) -> None:
        """Start a new peak (a warm sandbox's next invocation). What the last run started is gone, or is found
        again at the next scan of /proc."""
        self.peak = 0
        self._pids = [self.root_pid]
        self._next_pss = 0.0

    def sample(self, *, final: bool = False) -> int | None:
        """Measure the tree and raise ``peak``; the bytes it uses now when they were measured, else None: its
        resident size cannot make a new peak (so it uses no more than ``peak``), or Pss is not due yet.

        ``final``: the run has ended, so the processes known are all there are (no scan of /proc), and Pss is due.
        """
        now = self._clock()
        if not final and now >= self._next_tree:
            self._next_tree = now + TREE_REFRESH_S
            self._pids = [self.root_pid, *(pid for pid, _, _ in descendants(self.root_pid))]
        resident = {pid: _resident(pid) for pid in self._pids}
        if sum(resident.values()) <= self.peak or (not final and now < self._next_pss):
            return None
        self._next_pss = now + PSS_INTERVAL_S
        used = self._proportional(resident)
        self.peak = max(self.peak, used)
        return used

    def _proportional(self, resident: dict[int, int]) -> int:
        alive = {pid: size for pid, size in resident.items() if size}
        # A page shared by two processes is split between them: when one of the tree's processes forks or exits,
        # the others' Pss changes though their resident size does not, so none of them keeps its last reading.
        known_pss = self._pss if alive.keys() == self._pss.keys() else {}
        kept = {}
        for pid, size in alive.items():
            known = known_pss.get(pid)
            if known is not None and known[0] == size:
                kept[pid] = known
                continue
            pss = _read_pss(pid)
            # No smaps_rollup (a kernel older than 4.14): the resident size is all there is.
            kept[pid] = (size, size if pss is None else pss)
        self._pss = kept
        return sum(pss for _, pss in kept.values())


def _resident(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):  # the process is gone
        return 0


def _read_pss(pid: int) -> int | None:
    """``pid``'s Pss in bytes; 0 when it is gone, None when the kernel does not give it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return None if not os.path.exists("/proc/self/smaps_rollup") else 0
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_usage(duration_ms: float, peak_bytes: int, memory_size_mb: int | None) -> RunUsage:
    """Lambda's ``REPORT`` figures of a run of ``duration_ms`` whose memory peaked at ``peak_bytes``."""
    duration_ms = round(duration_ms, 2)
    peak_mb = max(1, round(peak_bytes / MIB))
    if memory_size_mb:
        # Lambda never reports more than the function has: over it, the sandbox is killed.
        peak_mb = min(peak_mb, memory_size_mb)
    return RunUsage(duration_ms, max(1, math.ceil(duration_ms)), memory_size_mb, peak_mb)


@functools.cache
def this_sandbox_tree() -> TreeMemory:
    """This process and everything below it: the handler's sandbox, kept between its invocations."""
    return TreeMemory(os.getpid())


class RunMeter:
    """What the handler's run uses: its duration from the meter's start and the peak memory of the sandbox (the
    handler's process and everything below it, the tree the local Lambda service measures too)."""

    def __init__(
        self,
        memory_size_mb: int | None,
        memory: TreeMemory,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.memory_size_mb = memory_size_mb
        self.memory = memory
        self.memory.reset()
        self._clock = clock
        self._begin = clock()
        self._next_sample = self._begin

    @classmethod
    def start(cls, context: Any) -> RunMeter:
        """A meter for one invocation, from its start; the memory size as Lambda's context gives it (a string)."""
        try:
            memory_size_mb = int(getattr(context, "memory_limit_in_mb", None))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            memory_size_mb = None
        return cls(memory_size_mb, this_sandbox_tree())

    def sample(self) -> None:
        """Measure the tree when ``SAMPLE_INTERVAL_S`` has passed since the last time; cheap to call more often."""
        now = self._clock()
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_INTERVAL_S
            self.memory.sample()

    def usage(self) -> RunUsage:
        """The run's figures so far, its tree measured once more now (a short run may not have been yet)."""
        self.memory.sample(final=True)
        return run_usage((self._clock() - self._begin) * 1000, self.memory.peak, self.memory_size_mb)

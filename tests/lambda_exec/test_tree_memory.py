"""The one memory measure of a Lambda sandbox (``tree_memory``): a process tree, a page shared in it counted once;
and the figures of Lambda's ``REPORT`` line built from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from hybrid_router.lambda_exec import tree_memory
from hybrid_router.lambda_exec.protocol import RunUsage
from hybrid_router.lambda_exec.tree_memory import MIB, RunMeter, TreeMemory, run_usage

# Touches MB megabytes, then forks a child that keeps them (copy-on-write, as Airflow's supervisor forks the
# task runner), prints "ready" and sleeps: the two share the pages.
FORKED_HOLDER = r"""
import os, sys, time
ballast = bytearray(int(sys.argv[1]) * 1024 * 1024)
for offset in range(0, len(ballast), 4096):
    ballast[offset] = 1
if os.fork() == 0:
    os.write(1, b"child ready\n")  # one write each: the two lines must not interleave
    time.sleep(60)
    os._exit(0)
os.write(1, b"ready\n")
time.sleep(60)
"""


@pytest.fixture
def forked_holder() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", FORKED_HOLDER, "150"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        # Both sleep before the test measures them: a child still on its way there changes its resident size.
        assert {process.stdout.readline().strip() for _ in range(2)} == {"ready", "child ready"}
        time.sleep(0.2)  # from their last line into time.sleep: the pages that takes are touched by then
        yield process
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_pages_shared_in_the_tree_count_once(forked_holder: subprocess.Popen[str]) -> None:
    memory = TreeMemory(forked_holder.pid)
    used = memory.sample()

    resident = sum(tree_memory._resident(pid) for pid in memory._pids)
    assert len(memory._pids) == 2  # the holder and its forked child
    assert used == memory.peak
    # Each process has the 150 MB resident; Lambda counts them once (plus two interpreters).
    assert resident > 300 * MIB
    assert 150 * MIB < used < 200 * MIB


def test_proportional_size_is_read_only_when_due_and_a_new_peak_is_possible(
    forked_holder: subprocess.Popen[str],
) -> None:
    now = [100.0]
    memory = TreeMemory(forked_holder.pid, clock=lambda: now[0])
    first = memory.sample()
    assert first is not None and memory.peak == first
    # Within PSS_INTERVAL_S nothing is read; later the resident sum (two copies) still exceeds the peak.
    now[0] += tree_memory.PSS_INTERVAL_S / 2
    assert memory.sample() is None
    now[0] += tree_memory.PSS_INTERVAL_S
    assert memory.sample() == first
    # A peak no resident sum can beat: nothing is read, however long since, even at the end of a run.
    memory.peak = 10**15
    now[0] += 60
    assert memory.sample(final=True) is None


def test_a_process_whose_resident_size_is_unchanged_keeps_its_proportional_size(
    forked_holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = TreeMemory(forked_holder.pid)
    first = memory.sample()
    reads: list[int] = []
    monkeypatch.setattr(tree_memory, "_read_pss", lambda pid: reads.append(pid) or 0)
    memory.peak = 0  # as at a warm sandbox's next run, without forgetting its processes
    # The two sleeping processes have not changed: their proportional sizes are not read again.
    assert memory.sample(final=True) == first
    assert reads == []


# Touches MB megabytes and waits; on a line on stdin forks a child that keeps them, on the next one ends it.
HOLDER_THAT_FORKS_ON_REQUEST = r"""
import os, sys, time
ballast = bytearray(int(sys.argv[1]) * 1024 * 1024)
for offset in range(0, len(ballast), 4096):
    ballast[offset] = 1
print("ready", flush=True)
sys.stdin.readline()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print("forked", flush=True)
sys.stdin.readline()
os.kill(child, 9)
os.waitpid(child, 0)
print("ended", flush=True)
time.sleep(60)
"""


def test_a_fork_or_an_exit_in_the_tree_has_every_proportional_size_read_again() -> None:
    """The root's resident size does not change when it forks or its child ends, but its Pss does (the pages it
    shares are split with the child, then whole again): a size kept from before would count them twice, or half."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_THAT_FORKS_ON_REQUEST, "150"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        memory = TreeMemory(holder.pid)
        alone = memory.sample(final=True)
        assert alone is not None and alone > 150 * MIB

        def step(expected: str) -> None:
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == expected
            memory.peak = 0  # so that the next sample measures
            memory._next_tree = memory._next_pss = 0.0  # and finds the tree's processes now

        step("forked")
        forked = memory.sample()
        assert len(memory._pids) == 2 and forked is not None
        # The 150 MB counted once, not the root's whole share from before plus the child's half.
        assert forked < alone + 50 * MIB
        step("ended")
        ended = memory.sample(final=True)
        # The root alone again, its pages whole: not the half share it had while the child lived.
        assert ended is not None and abs(ended - alone) < 20 * MIB
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def test_a_new_run_starts_a_new_peak_from_the_root_alone(forked_holder: subprocess.Popen[str]) -> None:
    memory = TreeMemory(forked_holder.pid)
    memory.sample()
    memory.reset()
    # At the end of a run the processes known are all there are: no scan of /proc for more.
    used = memory.sample(final=True)
    assert memory._pids == [forked_holder.pid] and used == memory.peak
    assert 0 < used < 150 * MIB  # the holder's share of the 150 MB it shares with its child


def test_a_tree_that_is_gone_uses_nothing() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    memory = TreeMemory(process.pid)
    assert memory.sample(final=True) is None and memory.peak == 0


@pytest.mark.parametrize(
    ("duration_ms", "peak_bytes", "size", "expected"),
    [
        (1234.001, 187.4 * MIB, 512, RunUsage(1234.0, 1234, 512, 187)),
        (1234.011, 187.6 * MIB, 512, RunUsage(1234.01, 1235, 512, 188)),  # billed: rounded up to the ms
        (0.2, 0, None, RunUsage(0.2, 1, None, 1)),  # never less than 1 ms, 1 MB
        (50.0, 900 * MIB, 512, RunUsage(50.0, 50, 512, 512)),  # never more than the function has
    ],
)
def test_report_figures(duration_ms: float, peak_bytes: float, size: int | None, expected: RunUsage) -> None:
    assert run_usage(duration_ms, int(peak_bytes), size) == expected


@pytest.mark.parametrize(("given", "size"), [("1024", 1024), (512, 512), (None, None), ("", None)])
def test_the_meter_takes_the_memory_size_from_lambdas_context(given: object, size: int | None) -> None:
    context = SimpleNamespace() if given is None else SimpleNamespace(memory_limit_in_mb=given)
    assert RunMeter.start(context).memory_size_mb == size


def test_the_meter_measures_its_sandbox_at_most_every_sample_interval() -> None:
    now = [10.0]
    calls = []

    class Recording(TreeMemory):
        def sample(self, *, final: bool = False) -> int | None:
            calls.append(final)
            return None

    meter = RunMeter(512, Recording(os.getpid()), clock=lambda: now[0])
    meter.sample()
    meter.sample()  # too soon
    now[0] += tree_memory.SAMPLE_INTERVAL_S
    meter.sample()
    meter.usage()
    assert calls == [False, False, True]


def test_the_handlers_meter_measures_this_process_and_everything_below_it() -> None:
    first = RunMeter.start(SimpleNamespace(memory_limit_in_mb="4096"))
    assert first.memory.root_pid == os.getpid()
    time.sleep(0.05)
    usage = first.usage()
    assert usage.duration_ms >= 50 and usage.billed_duration_ms >= usage.duration_ms
    # This test process, imported pytest and all, is in the tree.
    assert usage.memory_size_mb == 4096 and 10 < usage.peak_memory_mb <= 4096
    # One tree per process, kept between invocations; each invocation's peak its own.
    second = RunMeter.start(SimpleNamespace())
    assert second.memory is first.memory and second.memory.peak == 0

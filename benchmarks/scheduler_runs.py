"""Measuring DAG runs through a real scheduler: what ``scheduler_dispatch.py`` and ``scale.py`` share.

- queued -> running: from the scheduler's first queueing of each try (its own log line) to the task instance's
  ``start_date`` (its ``/run``);
- CPU of process trees (a root process, its live descendants and the children it reaped) between two
  snapshots, and how busy the whole machine was meanwhile;
- the scheduler's peak RSS: ``VmHWM`` since its start, or sampled through one run (``RssSampler``);
- the stack's plumbing: the metadata database, the scheduler restarted with other settings, a run's end read
  from the database, the local Lambda service gone idle, the AWS calls the fault layer logged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from devtools.devstack import AirflowStack, StackError, wait_until

QUEUED_LINE = re.compile(r"^(\S+Z) .*Setting the following tasks to queued state")
QUEUED_TI = re.compile(r"\(id=([0-9a-f-]+), try_number=(\d+)\)")
RUNNING_JOBS = "FROM job WHERE job_type = 'SchedulerJob' AND state = 'running'"


# -- queued -> running -------------------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 200 values is the 198th smallest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def first_queued(log_text: str) -> dict[tuple[str, int], float]:
    """When the scheduler first set each (task instance id, try) to queued, from its log (epoch seconds)."""
    found: dict[tuple[str, int], float] = {}
    at: float | None = None
    for line in log_text.splitlines():
        header = QUEUED_LINE.match(line)
        if header:
            at = datetime.fromisoformat(header.group(1).replace("Z", "+00:00")).timestamp()
        elif not line.startswith("\t"):
            at = None
        if at is None:
            continue
        for ti_id, try_number in QUEUED_TI.findall(line):
            found.setdefault((ti_id.replace("-", ""), int(try_number)), at)
    return found


def db_time(value: str | datetime) -> float:
    """A timestamp as the database gives it: a datetime (PostgreSQL) or naive UTC text (SQLite)."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def read_from(path: Path, offset: int) -> str:
    """A log file's text from ``offset`` on (what a process wrote since an earlier ``stat().st_size``)."""
    with open(path, encoding="utf-8", errors="replace") as log:
        log.seek(offset)
        return log.read()


def queued_to_running(
    stack: AirflowStack, dag_id: str, run_id: str, scheduler_log: str
) -> tuple[list[float], int]:
    """Each task instance's wait from the scheduler's first queueing of its try (in ``scheduler_log``, the
    scheduler's log since before the run) to its start, and how many had no such wait (never started, or no
    queued line)."""
    tis = stack.sql(
        "SELECT id, try_number, start_date FROM task_instance WHERE dag_id = ? AND run_id = ?",
        (dag_id, run_id),
    )
    queued = first_queued(scheduler_log)
    # SQLite keeps a UUID as 32 hex digits, PostgreSQL as a UUID: compare both without hyphens.
    waits = [
        db_time(started) - queued[(str(ti_id).replace("-", ""), tries)]
        for ti_id, tries, started in tis
        if (str(ti_id).replace("-", ""), tries) in queued and started is not None
    ]
    return waits, len(tis) - len(waits)


def run_wall_s(stack: AirflowStack, dag_id: str, run_id: str) -> float:
    """The DAG run's own ``end_date - start_date``, both set by the scheduler (its start-up is not in it)."""
    (start, end), *_ = stack.sql(
        "SELECT start_date, end_date FROM dag_run WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)
    )
    return db_time(end) - db_time(start)


# -- CPU and memory of process trees -----------------------------------------------------------------------------


@dataclass
class CpuSnapshot:
    own: dict[str, float]  # per role: the root process's own user + system
    reaped: dict[str, float]  # per role: the root's reaped children
    tree: dict[str, dict[int, float]]  # per role: each live descendant's own and reaped CPU
    machine_busy: float


def _cpu_total(times: Any, with_children: bool) -> float:
    total = times.user + times.system
    if with_children:
        total += times.children_user + times.children_system
    return total


def snapshot(roots: Mapping[str, int | None]) -> CpuSnapshot:
    own: dict[str, float] = {}
    reaped: dict[str, float] = {}
    tree: dict[str, dict[int, float]] = {}
    for role, pid in roots.items():
        own[role], reaped[role], tree[role] = 0.0, 0.0, {}
        if pid is None:
            continue
        try:
            root = psutil.Process(pid)
            times = root.cpu_times()
            own[role] = _cpu_total(times, False)
            reaped[role] = times.children_user + times.children_system
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                tree[role][child.pid] = _cpu_total(child.cpu_times(), True)
            except psutil.NoSuchProcess:
                pass
    return CpuSnapshot(own, reaped, tree, machine_busy_s())


def own_cpu(before: CpuSnapshot, after: CpuSnapshot, role: str) -> float:
    """CPU the root process of ``role`` itself used between the snapshots."""
    return after.own[role] - before.own[role]


def descendants_cpu(before: CpuSnapshot, after: CpuSnapshot, role: str) -> float:
    """CPU the root's descendants used between the snapshots: the live ones' own and reaped children's, and the
    root's children reaped meanwhile, less what those had used before (a reaped process adds its whole life's
    CPU to its parent's: an idle sandbox of an earlier run ending now would count that run's work)."""
    spent = after.reaped[role] - before.reaped[role]
    for pid, total in after.tree[role].items():
        spent += total - before.tree[role].get(pid, 0.0)
    for pid, total in before.tree[role].items():
        if pid not in after.tree[role]:
            spent -= total
    return max(spent, 0.0)


def tree_cpu(before: CpuSnapshot, after: CpuSnapshot, role: str) -> float:
    """CPU of the root process of ``role`` and of all its descendants between the snapshots."""
    return own_cpu(before, after, role) + descendants_cpu(before, after, role)


def stack_roots(stack: AirflowStack, scheduler_pid: int, service: Any, moto: Any) -> dict[str, int | None]:
    """The root process of each part of a stack with the local Lambda service, by ``StackCpu``'s roles."""
    return {
        "scheduler": scheduler_pid,
        "lambda": service.pid,
        "moto": moto.pid,
        "api": stack.pid("api-server"),
        "dag_processor": stack.pid("dag-processor"),
    }


@dataclass(frozen=True)
class StackCpu:
    """CPU seconds each part of the stack (``stack_roots``) used between snapshots ``measured_s`` apart."""

    scheduler: float  # the scheduler's main process only
    scheduler_children: float  # its descendants: LocalExecutor workers and the task processes they start
    sandboxes: float  # the local Lambda service's descendants: its sandboxes and what they start
    lambda_service: float
    moto: float
    api_server: float  # with its workers
    dag_processor: float  # with its children
    machine_busy: float  # anything's, other load on the machine included
    measured_s: float

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot, measured_s: float) -> StackCpu:
        return cls(
            scheduler=own_cpu(before, after, "scheduler"),
            scheduler_children=descendants_cpu(before, after, "scheduler"),
            sandboxes=descendants_cpu(before, after, "lambda"),
            lambda_service=own_cpu(before, after, "lambda"),
            moto=own_cpu(before, after, "moto"),
            api_server=tree_cpu(before, after, "api"),
            dag_processor=tree_cpu(before, after, "dag_processor"),
            machine_busy=after.machine_busy - before.machine_busy,
            measured_s=measured_s,
        )

    @property
    def stack(self) -> float:
        """The stack's own processes' CPU (not other load's)."""
        return (
            self.scheduler
            + self.scheduler_children
            + self.sandboxes
            + self.lambda_service
            + self.moto
            + self.api_server
            + self.dag_processor
        )

    def share(self, cpu_s: float) -> float:
        """``cpu_s`` as a share of all the cores' time while measured: near 1 says the CPU bounded the run."""
        cores = os.cpu_count() or 1
        return cpu_s / (self.measured_s * cores) if self.measured_s else 0.0


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (``/proc/stat``: all but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(value) for value in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """The process's peak RSS since it started (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """The highest RSS of one process seen while the ``with`` block runs, sampled from a thread: ``VmHWM``
    would also hold the peaks of its start-up and of the runs before."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="rss-sampler", daemon=True)
        self.peak_bytes = 0
        self.samples = 0

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 1024 / 1024

    def sample(self) -> None:
        try:
            rss = self._process.memory_info().rss
        except psutil.NoSuchProcess:
            return
        self.peak_bytes = max(self.peak_bytes, rss)
        self.samples += 1

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the end of the run, however short it was


# -- the stack ---------------------------------------------------------------------------------------------------


@contextmanager
def database(kind: str) -> Iterator[str | None]:
    """Airflow's metadata database: None for a SQLite file in the stack's home, or a PostgreSQL cluster's URL."""
    if kind == "sqlite":
        yield None
        return
    from devtools.postgres import PostgresServer

    with PostgresServer() as server:
        yield server.url


def restart_scheduler(stack: AirflowStack, env_changes: Mapping[str, str]) -> int:
    """Restart only the scheduler, with ``env_changes`` in ``stack.env``; once it loops, its main pid."""
    stack.kill_scheduler(signal.SIGTERM, group=True)
    try:
        # SQLite allows one scheduler: the old one must have closed its job.
        wait_until(
            lambda: stack.sql(f"SELECT count(*) {RUNNING_JOBS}") == [(0,)], 120, "the scheduler to stop"
        )
    except StackError:
        # Its end() stuck on a worker (seen on a loaded machine): it schedules nothing more; its group is swept
        # when the stack stops.
        print("previous scheduler did not stop within 120 s; closing its job and going on", flush=True)
        stack.sql(f"UPDATE job SET state = 'failed' WHERE id IN (SELECT id {RUNNING_JOBS})")
    stack.env.update(env_changes)
    began = time.time()
    stack.start_scheduler()
    # Measured runs start once the scheduler loops (its executor started, its workers forked): a heartbeat
    # of the new job after its start.
    wait_until(
        lambda: (
            stack.check_alive()
            and stack.sql(
                f"SELECT count(*) {RUNNING_JOBS} AND latest_heartbeat > start_date AND start_date >= ?",
                (datetime.fromtimestamp(began - 1, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),),
            )
            != [(0,)]
        ),
        180,
        "the new scheduler to loop",
        interval=0.5,
    )
    time.sleep(1.0)
    pid = stack.pid("scheduler")
    assert pid is not None
    return pid


def wait_run(stack: AirflowStack, dag_id: str, run_id: str, timeout: float) -> str:
    """The run's final state, read from the database: the API server of a loaded machine can take longer than a
    REST call's timeout to answer while many task runners call it."""

    def finished() -> str | None:
        stack.check_alive()
        rows = stack.sql("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", (dag_id, run_id))
        return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None

    return wait_until(finished, timeout, f"run {run_id!r} of {dag_id!r} to finish", interval=0.5)


def wait_lambda_idle(service: Any, timeout: float = 600) -> None:
    """Nothing queued or running in any function: a run's leftovers never spend the next run's CPU."""

    def idle() -> bool:
        functions = service.stats()["functions"]
        return all(f.get("queued", 0) == 0 and f.get("in_flight", 0) == 0 for f in functions.values())

    wait_until(idle, timeout, "the local Lambda service to go idle", interval=0.5)


# -- AWS calls ---------------------------------------------------------------------------------------------------


def calls_since(calls_log: Path, offset: int) -> list[dict[str, Any]]:
    """The AWS calls the fault layer logged (``calls_log``) since ``offset``: one dict per call."""
    if not calls_log.exists():
        return []
    with open(calls_log, encoding="utf-8") as log:
        log.seek(offset)
        return [json.loads(line) for line in log.read().splitlines() if line]


def count_calls(found: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Calls per operation (``sqs.ReceiveMessage``...), sorted by name."""
    counts: dict[str, int] = {}
    for call in found:
        counts[call["operation"]] = counts.get(call["operation"], 0) + 1
    return dict(sorted(counts.items()))

"""A journal of task bodies: each run of a task appends a start line and an end line to one file.

The fault-injection tests, the chaos soak and the failover benchmark judge "one run per try" from it, not from
what Airflow says: a line is ``start|end dag task map_index try run time``, where ``run`` is the Lambda run
(``HYBRID_ROUTER_RUN_ID``, set by the handler in the task's environment) or ``pid<N>`` for a run elsewhere (the
Local fallback or overflow), and ``time`` is the wall clock in seconds.

``JOURNAL_DAG_HELPERS`` is Python source for a DAG file (format it with ``journal=``); ``read_journal`` and
``check_journal`` read the file back and count what went wrong.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

JOURNAL_DAG_HELPERS = '''
import os
import time

from airflow.sdk import get_current_context

JOURNAL = %(journal)r


def note(what):
    """Append one journal line for the running try (one write call, so lines of parallel runs never mix)."""
    ti = get_current_context()["ti"]
    run = os.environ.get("HYBRID_ROUTER_RUN_ID") or f"pid{os.getpid()}"
    line = f"{what} {ti.dag_id} {ti.task_id} {ti.map_index} {ti.try_number} {run} {time.time():.3f}\\n"
    with open(JOURNAL, "a") as out:
        out.write(line)


def journaled_body(seconds):
    """A task body that records its start and its end around ``seconds`` of work."""
    note("start")
    time.sleep(seconds)
    note("end")
'''


@dataclass(frozen=True)
class JournalLine:
    what: str  # "start" or "end"
    dag_id: str
    task_id: str
    map_index: int
    try_number: int
    run: str
    at: float

    @property
    def task(self) -> tuple[str, str, int]:
        return self.dag_id, self.task_id, self.map_index

    @property
    def attempt(self) -> tuple[str, str, int, int]:
        return self.dag_id, self.task_id, self.map_index, self.try_number


def read_journal(path: Path | str) -> list[JournalLine]:
    """Every complete line of the journal, in file order (a line cut short by a killed run is skipped)."""
    lines = []
    for raw in Path(path).read_text(errors="replace").splitlines():
        parts = raw.split()
        if len(parts) != 7 or parts[0] not in ("start", "end"):
            continue
        what, dag_id, task_id, map_index, try_number, run, at = parts
        lines.append(JournalLine(what, dag_id, task_id, int(map_index), int(try_number), run, float(at)))
    return lines


@dataclass
class JournalReport:
    """What the journal says about each try, against the tasks that should each have completed once."""

    completed: dict[tuple[str, str, int], int] = field(default_factory=dict)  # task -> completed bodies
    lost: list[tuple[str, str, int]] = field(default_factory=list)  # expected tasks never completed
    double_runs: list[tuple[str, str, int]] = field(default_factory=list)  # tasks completed more than once
    overlaps: list[tuple[str, str, int, int]] = field(default_factory=list)  # tries with two runs at once
    stopped_runs: int = 0  # runs that started and never ended (stopped at a deadline, killed)
    retried: list[tuple[str, str, int]] = field(default_factory=list)  # tasks whose body ran at a try > 1

    @property
    def clean(self) -> bool:
        return not (self.lost or self.double_runs or self.overlaps)

    def summary(self) -> dict[str, int]:
        return {
            "lost": len(self.lost),
            "double_runs": len(self.double_runs),
            "overlaps": len(self.overlaps),
            "stopped_runs": self.stopped_runs,
        }


def check_journal(lines: Iterable[JournalLine], expected: Iterable[tuple[str, str, int]]) -> JournalReport:
    """Count, per task, the bodies that completed; a try's runs must follow one another: a run that never
    ended (stopped) may be followed by another run of the same try, but only after it started, and two
    completed runs of one try, or a run that starts while a completed one is still going, overlap."""
    runs: dict[tuple[str, str, int, int], dict[str, dict[str, float]]] = defaultdict(dict)
    for line in lines:
        runs[line.attempt].setdefault(line.run, {})[line.what] = line.at
    report = JournalReport()
    completed: dict[tuple[str, str, int], int] = defaultdict(int)
    for attempt, by_run in runs.items():
        task = attempt[:3]
        spans = sorted(
            (marks.get("start", marks.get("end", 0.0)), marks.get("end")) for marks in by_run.values()
        )
        for _start, end in spans:
            if end is None:
                report.stopped_runs += 1
            else:
                completed[task] += 1
                if attempt[3] > 1 and task not in report.retried:
                    report.retried.append(task)
        # Two runs of one try overlap when a later one starts before an earlier completed one ended.
        for (_, earlier_end), (later_start, _) in pairwise(spans):
            if earlier_end is not None and later_start < earlier_end:
                report.overlaps.append(attempt)
                break
    report.completed = dict(completed)
    for task in expected:
        count = completed.get(task, 0)
        if count == 0:
            report.lost.append(task)
        elif count > 1:
            report.double_runs.append(task)
    report.double_runs += [
        task for task, count in completed.items() if count > 1 and task not in report.double_runs
    ]
    return report

"""Route a table of tasks with a policy and summarise the outcome: ``hybrid-router simulate``.

The table comes from a CSV file (one row per task, optionally with a run count) or from the successful runs in
Airflow's metadata database. The summary shows where the work would go (tasks and task-hours per executor),
how often each rule fires, and which rules never do.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybrid_router.router.history import TaskKey, TaskRunStats, trusted_p95
from hybrid_router.router.policy import (
    Policy,
    TaskFacts,
    parse_duration,
    parse_memory_mb,
    resolve_facts,
)

REQUIRED_COLUMNS = ("dag_id", "task_id")
OPTIONAL_COLUMNS = ("queue", "pool", "operator", "duration", "memory_mb", "count")
TASKS_FILE_SOURCE = "tasks_file"
NO_RULE = "(policy defaults.run_on)"


class TaskTableError(ValueError):
    """A task table with bad rows; ``problems`` has one ``file:line: column: message`` per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TaskRow:
    """One task to route, standing for ``count`` runs of it."""

    facts: TaskFacts
    count: int = 1
    # measured worker seconds of all ``count`` runs; None: count x the decision's expected duration
    worker_seconds: float | None = None


def _parse_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"must be a whole number >= 1, got {text}")
    return int(text)


def _cell(record: Mapping[str, str | None], column: str) -> str | None:
    value = (record.get(column) or "").strip()
    return value or None


def _row_from_record(record: Mapping[str, str | None], where: str, problems: list[str]) -> TaskRow | None:
    """The row's task, or None after adding each of its problems to ``problems``."""
    found = len(problems)
    problems.extend(
        f"{where}: {column}: must not be empty"
        for column in REQUIRED_COLUMNS
        if _cell(record, column) is None
    )
    parsed: dict[str, Any] = {}
    for column, parse in (
        ("duration", parse_duration),
        ("memory_mb", parse_memory_mb),
        ("count", _parse_count),
    ):
        text = _cell(record, column)
        if text is None:
            continue
        try:
            parsed[column] = parse(text)
        except ValueError as error:
            problems.append(f"{where}: {column}: {error}")
    if len(problems) > found:
        return None
    duration, memory = parsed.get("duration"), parsed.get("memory_mb")
    facts = TaskFacts(
        dag_id=_cell(record, "dag_id"),
        task_id=_cell(record, "task_id"),
        queue=_cell(record, "queue"),
        pool=_cell(record, "pool"),
        operator=_cell(record, "operator"),
        expected_duration_s=duration,
        duration_source=TASKS_FILE_SOURCE if duration is not None else None,
        memory_mb=memory,
        memory_source=TASKS_FILE_SOURCE if memory is not None else None,
    )
    return TaskRow(facts=facts, count=parsed.get("count", 1))


def read_tasks_csv(path: str | Path) -> list[TaskRow]:
    """Read a task table; every bad row is reported (``TaskTableError``), none is silently dropped."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or ()]
            reader.fieldnames = header
            problems = _header_problems(path, header)
            if problems:
                raise TaskTableError(problems)
            rows = []
            for record in reader:
                where = f"{path}:{reader.line_num}"
                if None in record:  # DictReader puts the cells beyond the header under the key None
                    problems.append(f"{where}: {len(record[None])} more cells than the header has columns")
                    continue
                row = _row_from_record(record, where, problems)
                if row is not None:
                    rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise TaskTableError([f"{path}: cannot read: {error}"]) from error
    if problems:
        raise TaskTableError(problems)
    if not rows:
        raise TaskTableError([f"{path}: no tasks in the file"])
    return rows


def _header_problems(path: Path, header: Sequence[str]) -> list[str]:
    if not header:
        return [f"{path}:1: empty file, expected a header row with {', '.join(REQUIRED_COLUMNS)}"]
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    problems = [f"{path}:1: {column}: missing column" for column in REQUIRED_COLUMNS if column not in header]
    problems += [
        f"{path}:1: {column or '(empty)'}: unknown column (known: {', '.join(sorted(known))})"
        for column in header
        if column not in known
    ]
    problems += [f"{path}:1: {column}: column given twice" for column, n in Counter(header).items() if n > 1]
    return problems


def rows_from_history(stats: Mapping[TaskKey, TaskRunStats], min_runs: int) -> list[TaskRow]:
    """One row per task with runs in the database: routed as the router would route its next run."""

    return [
        TaskRow(
            facts=resolve_facts(
                dag_id=task.dag_id,
                task_id=task.task_id,
                queue=task.queue,
                pool=task.pool,
                operator=task.operator,
                history=lambda dag_id, task_id: trusted_p95(stats, dag_id, task_id, min_runs),
            ),
            count=task.runs,
            worker_seconds=task.worker_seconds,
        )
        for task in sorted(stats.values(), key=lambda task: (task.dag_id, task.task_id))
    ]


@dataclass
class ExecutorLoad:
    tasks: int = 0
    task_hours: float = 0.0


@dataclass
class RuleHits:
    index: int
    name: str
    line: int
    hits: int = 0


@dataclass
class SimulationReport:
    policy_file: str
    source: str
    rows: int = 0
    tasks: int = 0
    executors: dict[str, ExecutorLoad] = field(default_factory=dict)
    rules: list[RuleHits] = field(default_factory=list)
    unmatched: int = 0  # runs no rule took: the policy's defaults.run_on did

    @property
    def never_fired(self) -> list[RuleHits]:
        return [rule for rule in self.rules if rule.hits == 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy_file,
            "source": self.source,
            "rows": self.rows,
            "tasks": self.tasks,
            "executors": {
                name: {"tasks": load.tasks, "task_hours": round(load.task_hours, 3)}
                for name, load in sorted(self.executors.items())
            },
            "rules": [
                {"index": rule.index, "name": rule.name, "line": rule.line, "hits": rule.hits}
                for rule in self.rules
            ],
            "unmatched": self.unmatched,
            "never_fired": [rule.name for rule in self.never_fired],
        }

    def to_text(self) -> str:
        lines = [
            f"Routed {self.tasks} task runs ({self.rows} rows, {self.source}) with {self.policy_file}",
            "",
        ]
        lines += _table(
            ("executor", "tasks", "task-hours"),
            [
                (name, str(load.tasks), f"{load.task_hours:.2f}")
                for name, load in sorted(self.executors.items(), key=lambda item: -item[1].task_hours)
            ],
        )
        lines.append("")
        lines += _table(
            ("#", "rule", "line", "hits"),
            [(str(rule.index), rule.name, str(rule.line), str(rule.hits)) for rule in self.rules]
            + ([("-", NO_RULE, "-", str(self.unmatched))] if self.unmatched else []),
        )
        lines.append("")
        if self.never_fired:
            lines.append("Rules that never fire:")
            lines += [f"  #{rule.index} {rule.name} (line {rule.line})" for rule in self.never_fired]
        else:
            lines.append("Every rule fires at least once.")
        return "\n".join(lines)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def simulate(
    policy: Policy,
    rows: Iterable[TaskRow],
    *,
    policy_file: str,
    source: str,
) -> SimulationReport:
    """Route every row with ``policy.decide`` and add up the outcome."""
    report = SimulationReport(
        policy_file=policy_file,
        source=source,
        rules=[RuleHits(rule.index, rule.name, rule.line) for rule in policy.rules],
    )
    by_index = {rule.index: rule for rule in report.rules}
    for row in rows:
        decision = policy.decide(row.facts)
        report.rows += 1
        report.tasks += row.count
        load = report.executors.setdefault(decision.executor, ExecutorLoad())
        load.tasks += row.count
        seconds = row.worker_seconds
        if seconds is None:
            seconds = row.count * (decision.expected_duration_s or 0.0)
        load.task_hours += seconds / 3600
        rule = by_index.get(decision.rule_index)
        if rule is None:
            report.unmatched += row.count
        else:
            rule.hits += row.count
    return report

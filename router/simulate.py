"""Route a table of tasks with a policy and summarise the outcome: ``hybrid-router simulate``.

The table comes from a CSV file (one row per task, optionally with a run count) or from the successful runs in
Airflow's metadata database. The summary shows where the work would go (tasks and task-hours per executor),
how often each rule fires, and which rules never do; priced (``cost_model.Costing``), what it would cost, how
long its tasks would wait to start and how many runs would fall back. ``compare_text`` sets two side by side.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybrid_router.router.history import TaskKey, TaskRunStats, trusted_p95
from hybrid_router.router.policy import (
    MemoryLookup,
    Policy,
    TaskFacts,
    format_duration,
    parse_duration,
    parse_memory_mb,
    resolve_facts,
)

if TYPE_CHECKING:
    from hybrid_router.router.cost_model import Costing, RowCost

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


def rows_from_history(
    stats: Mapping[TaskKey, TaskRunStats], min_runs: int, memory: MemoryLookup | None = None
) -> list[TaskRow]:
    """One row per task with runs in the database: routed as the router would route its next run (with its
    measured memory when ``memory`` is given)."""

    return [
        TaskRow(
            facts=resolve_facts(
                dag_id=task.dag_id,
                task_id=task.task_id,
                queue=task.queue,
                pool=task.pool,
                operator=task.operator,
                history=lambda dag_id, task_id: trusted_p95(stats, dag_id, task_id, min_runs),
                memory=memory,
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
    # priced reports only: fallback runs are re-runs of tasks counted on the executor they died on
    cost_usd: float = 0.0
    start_latency_s: float = 0.0
    fallback_runs: float = 0.0


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
    # priced reports only (``simulate(costing=...)``)
    prices: dict[str, Any] | None = None
    fallbacks_by_reason: dict[str, float] = field(default_factory=dict)
    failed_tries: float = 0.0  # runs expected to die with no fallback for their reason
    notes: list[str] = field(default_factory=list)

    @property
    def never_fired(self) -> list[RuleHits]:
        return [rule for rule in self.rules if rule.hits == 0]

    @property
    def task_hours(self) -> float:
        return math.fsum(load.task_hours for load in self.executors.values())

    @property
    def cost_usd(self) -> float:
        return math.fsum(load.cost_usd for load in self.executors.values())

    @property
    def start_latency_s(self) -> float:
        return math.fsum(load.start_latency_s for load in self.executors.values())

    @property
    def fallbacks(self) -> float:
        return math.fsum(self.fallbacks_by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        priced = self.prices is not None
        result: dict[str, Any] = {
            "policy": self.policy_file,
            "source": self.source,
            "rows": self.rows,
            "tasks": self.tasks,
            "executors": {
                name: {"tasks": load.tasks, "task_hours": round(load.task_hours, 3)}
                | (
                    {
                        "cost_usd": round(load.cost_usd, 6),
                        "start_latency_s": round(load.start_latency_s, 3),
                        "fallback_runs": round(load.fallback_runs, 3),
                    }
                    if priced
                    else {}
                )
                for name, load in sorted(self.executors.items())
            },
            "rules": [
                {"index": rule.index, "name": rule.name, "line": rule.line, "hits": rule.hits}
                for rule in self.rules
            ],
            "unmatched": self.unmatched,
            "never_fired": [rule.name for rule in self.never_fired],
        }
        if priced:
            result |= {
                "task_hours": round(self.task_hours, 3),
                "cost_usd": round(self.cost_usd, 6),
                "start_latency_s": round(self.start_latency_s, 3),
                "fallbacks": round(self.fallbacks, 3),
                "fallbacks_by_reason": {
                    reason: round(n, 3) for reason, n in sorted(self.fallbacks_by_reason.items())
                },
                "failed_tries": round(self.failed_tries, 3),
                "prices": self.prices,
                "notes": self.notes,
            }
        return result

    def to_text(self) -> str:
        lines = [
            f"Routed {self.tasks} task runs ({self.rows} rows, {self.source}) with {self.policy_file}",
            "",
        ]
        lines += self.executor_table()
        lines.append("")
        if self.prices is not None:
            lines += [*self._totals(), ""]
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
        if self.notes:
            lines += ["", "How each executor was priced:", *(f"  {note}" for note in self.notes)]
        return "\n".join(lines)

    def executor_table(self) -> list[str]:
        loads = sorted(self.executors.items(), key=lambda item: -item[1].task_hours)
        if self.prices is None:
            return _table(
                ("executor", "tasks", "task-hours"),
                [(name, str(load.tasks), f"{load.task_hours:.2f}") for name, load in loads],
            )
        return _table(
            ("executor", "tasks", "task-hours", "cost $", "start latency", "fallback runs"),
            [
                (
                    name,
                    str(load.tasks),
                    f"{load.task_hours:.2f}",
                    format_dollars(load.cost_usd),
                    format_duration(load.start_latency_s),
                    f"{load.fallback_runs:.1f}",
                )
                for name, load in loads
            ],
        )

    def _totals(self) -> list[str]:
        by_reason = ", ".join(f"{reason} {n:.1f}" for reason, n in sorted(self.fallbacks_by_reason.items()))
        prices = self.prices or {}
        return [
            f"Cost: ${format_dollars(self.cost_usd)} at AWS list prices for {prices.get('region')} taken "
            f"{prices.get('taken')}",
            f"Start latency: {format_duration(self.start_latency_s)} in all",
            f"Fallbacks expected from measured failures: {self.fallbacks:.1f}"
            + (f" ({by_reason})" if by_reason else ""),
            f"Tries expected to fail with no fallback for their reason: {self.failed_tries:.1f}",
        ]


def format_dollars(amount: float) -> str:
    # small per-task figures stay readable without hiding cents on large ones
    return f"{amount:,.4f}" if amount < 100 else f"{amount:,.2f}"


def compare_text(reports: Sequence[SimulationReport]) -> str:
    """Priced reports of several policies on the same task table, side by side, then each one's split."""
    first = reports[0]
    prices = first.prices or {}
    lines = [
        f"Compared on {first.tasks} task runs ({first.rows} rows, {first.source}); AWS list prices for "
        f"{prices.get('region')} taken {prices.get('taken')}",
        "",
    ]
    lines += _table(
        ("", *(report.policy_file for report in reports)),
        [
            ("tasks", *(str(report.tasks) for report in reports)),
            ("task-hours", *(f"{report.task_hours:.2f}" for report in reports)),
            ("cost $", *(format_dollars(report.cost_usd) for report in reports)),
            ("start latency", *(format_duration(report.start_latency_s) for report in reports)),
            ("fallbacks", *(f"{report.fallbacks:.1f}" for report in reports)),
            ("failed tries", *(f"{report.failed_tries:.1f}" for report in reports)),
        ],
    )
    for report in reports:
        lines += ["", report.policy_file, *(f"  {line}" for line in report.executor_table())]
    notes = list(dict.fromkeys(note for report in reports for note in report.notes))
    if notes:
        lines += ["", "How each executor was priced:", *(f"  {note}" for note in notes)]
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
    costing: Costing | None = None,
) -> SimulationReport:
    """Route every row with ``policy.decide`` and add up the outcome; priced too when ``costing`` is given."""
    report = SimulationReport(
        policy_file=policy_file,
        source=source,
        rules=[RuleHits(rule.index, rule.name, rule.line) for rule in policy.rules],
        prices=None if costing is None else costing.prices.to_dict(),
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
        if costing is None:
            load.task_hours += seconds / 3600
        else:
            _add_costs(
                report, costing.price(decision, (row.facts.dag_id, row.facts.task_id), row.count, seconds)
            )
        rule = by_index.get(decision.rule_index)
        if rule is None:
            report.unmatched += row.count
        else:
            rule.hits += row.count
    if costing is not None:
        report.notes = costing.notes(report.executors)
    return report


def _add_costs(report: SimulationReport, row: RowCost) -> None:
    for executor, charge in row.charges.items():
        load = report.executors.setdefault(executor, ExecutorLoad())
        load.task_hours += charge.seconds / 3600
        load.cost_usd += charge.cost_usd
        load.start_latency_s += charge.start_latency_s
        load.fallback_runs += charge.fallback_runs
    for reason, runs in row.fallbacks.items():
        report.fallbacks_by_reason[reason] = report.fallbacks_by_reason.get(reason, 0.0) + runs
    report.failed_tries += row.failed_tries

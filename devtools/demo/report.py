"""The demo's routing report: ``report.json``, the printed table, and the introduction printed first."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from devtools.demo.expected import MAIN_DAG, MEMORY_DAG, Verdict
from devtools.demo.observed import Observed

# How the table names where a memory figure came from (the routed audit row's memory_source); the learned ones
# are spelled out under the table.
MEMORY_SOURCES = {"policy_default": "default", "out_of_memory": "learned", "measured": "learned"}


def report_dict(
    verdicts: Sequence[Verdict],
    general: Sequence[str],
    run_states: dict[str, list[str | None]],
    timings: dict[str, float],
    simulation: dict[str, Any] | None = None,
    explanation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "ok": not general and all(v.ok for v in verdicts),
        "dag_runs": run_states,
        "problems": list(general),
        "timings_s": timings,
        "simulation": simulation,
        "explain": explanation,
        "tasks": [
            {
                **asdict(v.observed),
                "label": v.observed.label,
                "expected": asdict(v.expected) if v.expected else None,
                "ok": v.ok,
                "problems": v.problems,
            }
            for v in verdicts
        ],
    }


def print_report(verdicts: Sequence[Verdict], general: Sequence[str], *, by_scheduler: bool = False) -> None:
    """The table of every task; ``by_scheduler`` adds which scheduler queued each (several schedulers)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="Routing report (from Airflow's task instances and the router's audit rows)",
        caption="queued->running: the task instance's queued_when to start_date; after a fallback, those of the "
        "run on the fallback executor. Details per task: report.json",
    )
    columns = [
        "task",
        "run",
        "rule",
        "executor(s)",
        "memory",
        "outcome",
        "queued->running",
        "fallback reason",
        "check",
    ]
    if by_scheduler:
        columns.insert(2, "queued by")
    for column in columns:
        # Names and figures stay whole; the rule and the check's sentences wrap.
        table.add_column(column, no_wrap=column not in ("rule", "check", "fallback reason"))
    dag_id = None
    for verdict in verdicts:
        seen = verdict.observed
        if seen.dag_id != dag_id:
            # A row of its own for each DAG's name: its tasks' rows name the task only.
            if dag_id is not None:
                table.add_section()
            dag_id = seen.dag_id
            table.add_row(f"[bold]{dag_id}[/]", *[""] * (len(columns) - 1))
        path = " -> ".join(seen.executors) or "-"
        if "overflow" in seen.how:
            path += " (overflow)"
        latency = "-" if seen.queued_to_running_s is None else f"{seen.queued_to_running_s:.2f}s"
        check_text = "[green]ok[/]" if verdict.ok else "[red]" + "; ".join(verdict.problems) + "[/]"
        cells = [
            "  " + seen.label,
            str(seen.run),
            seen.rule or "-",
            path,
            _memory_cell(seen),
            seen.state or "-",
            latency,
            ", ".join(seen.fallback_reasons) or "-",
            check_text,
        ]
        if by_scheduler:
            cells.insert(2, seen.queued_by or "-")
        table.add_row(*cells)
    # Piped output (CI, tests) gets a wide table rather than rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for verdict in verdicts:
        seen = verdict.observed
        if seen.memory_basis:
            console.print(f"{seen.dag_id}.{seen.label}, run {seen.run}: routed by memory {seen.memory_basis}")
    if by_scheduler:
        queued = Counter(v.observed.queued_by or "?" for v in verdicts)
        console.print(
            "Tasks queued per scheduler: " + ", ".join(f"{n}: {c}" for n, c in sorted(queued.items()))
        )
    for problem in general:
        console.print(f"[red]problem:[/] {problem}")


def _memory_cell(seen: Observed) -> str:
    if seen.memory_mb is None:
        return "-"
    source = seen.memory_source or "?"
    return f"{seen.memory_mb:,} MB {MEMORY_SOURCES.get(source, source)}"


def print_command(result: dict[str, Any]) -> None:
    """A ``hybrid-router`` command the demo ran, and what it answered."""
    print(f"\n$ {result['command']}")
    print(result["output"].rstrip() or "(no output)")
    if result["returncode"] != 0:
        print(f"(exit code {result['returncode']}) {result['errors'].strip()}")


def print_simulation(simulation: dict[str, Any], base: Path) -> None:
    """What ``simulate --from-db --compare`` said of the demo's history, and where its HTML report is."""
    print_command(simulation)
    if simulation["returncode"] == 0:
        print(f"HTML report with charts: {display_path(Path(simulation['html']), base)}")


def print_intro(home: Path, policy: Path) -> None:
    cwd = Path.cwd()
    airflow = f"AIRFLOW_HOME={display_path(home, cwd)} {display_path(Path(sys.executable).with_name('airflow'), cwd)}"
    shown_policy = display_path(policy, cwd)
    print(
        "airflow-hybrid-router demo: Airflow + the router + a local Lambda service + moto's SQS, on 127.0.0.1"
    )
    print("To explore the routing (during or after the demo; simulate reads the demo's task history):")
    print(f"  {airflow} hybrid-router validate {shown_policy}")
    print(
        f"  {airflow} hybrid-router explain --policy {shown_policy} --dag-id {MAIN_DAG} --task-id long_task "
        "--expected-duration 40m"
    )
    print(
        f"  {airflow} hybrid-router explain --policy {shown_policy} --dag-id {MEMORY_DAG} --task-id memory_hog"
    )
    print(f"  {airflow} hybrid-router simulate --policy {shown_policy} --from-db")
    print(flush=True)


def display_path(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)

"""The demo's routing report: ``report.json``, the printed table, and the introduction printed first."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from devtools.demo.expected import MAIN_DAG, Verdict


def report_dict(
    verdicts: Sequence[Verdict],
    general: Sequence[str],
    run_states: dict[str, str | None],
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "ok": not general and all(v.ok for v in verdicts),
        "dag_runs": run_states,
        "problems": list(general),
        "timings_s": timings,
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


def print_report(verdicts: Sequence[Verdict], general: Sequence[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="Routing report (from Airflow's task instances and the router's audit rows)",
        caption="queued->running: the task instance's queued_when to start_date; after a fallback, those of the "
        "run on the fallback executor. Details per task: report.json",
    )
    for column in ("task", "rule", "executor(s)", "outcome", "queued->running", "fallback reason", "check"):
        table.add_column(column)
    for verdict in verdicts:
        seen = verdict.observed
        path = " -> ".join(seen.executors) or "-"
        if "overflow" in seen.how:
            path += " (overflow)"
        latency = "-" if seen.queued_to_running_s is None else f"{seen.queued_to_running_s:.2f}s"
        check_text = "[green]ok[/]" if verdict.ok else "[red]" + "; ".join(verdict.problems) + "[/]"
        table.add_row(
            seen.label if seen.dag_id == MAIN_DAG else f"{seen.dag_id}.{seen.label}",
            seen.rule or "-",
            path,
            seen.state or "-",
            latency,
            ", ".join(seen.fallback_reasons) or "-",
            check_text,
        )
    # Piped output (CI, tests) gets a wide table rather than rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for problem in general:
        console.print(f"[red]problem:[/] {problem}")


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
    print(f"  {airflow} hybrid-router simulate --policy {shown_policy} --from-db")
    print(flush=True)


def display_path(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)

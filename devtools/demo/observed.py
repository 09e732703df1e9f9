"""What happened in the demo, read from Airflow itself.

Task instances come from the REST API, the router's audit rows from the REST API's event logs (the ``log``
table), and each task's ``external_executor_id`` from the metadata database (SQL).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from devtools.devstack import AirflowStack
from hybrid_router.router.audit import AUDIT_OWNER, EVENT_FALLBACK, EVENT_ROUTED, EVENT_RUN_FINISHED

ROUTING_EVENTS = (EVENT_ROUTED, EVENT_FALLBACK)
# Rows every run gets (what it used): no sign of anything unexpected.
EXPECTED_EVENTS = (*ROUTING_EVENTS, EVENT_RUN_FINISHED)


@dataclass
class Observed:
    """One task instance as Airflow recorded it."""

    dag_id: str
    task_id: str
    map_index: int
    state: str | None
    try_number: int
    executors: list[str]  # from the router's audit rows, in order: where each run of this try went
    rule: str | None
    duration_source: str | None  # where the router took the expected duration from
    how: list[str]  # "policy", "overflow", "fallback" per audit row
    fallback_reasons: list[str]
    fallback_details: list[str]
    other_events: list[str]  # the router's other audit rows (a fallback given up, a routing error)
    external_executor_id: str | None
    queued_to_running_s: float | None
    run_s: float | None
    start_date: str | None = None  # of the last run of the try (the fallback's, after a fallback)
    end_date: str | None = None
    queued_by: str | None = None  # the scheduler that queued the try (its process name, or its job id)
    run: int = 1  # which run of its DAG, in the order the demo triggered them
    run_id: str | None = None
    # The memory need the router routed the try by, where it came from and, when learned from measured runs,
    # how ("more than 512 MB: out of memory on lambda at ...").
    memory_mb: int | None = None
    memory_source: str | None = None
    memory_basis: str | None = None

    @property
    def label(self) -> str:
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((parse_timestamp(end) - parse_timestamp(start)).total_seconds(), 2)


def parse_timestamp(text: str) -> datetime:
    # The REST API writes UTC as "Z", which datetime.fromisoformat accepts only from Python 3.11.
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def observe(
    stack: AirflowStack, runs: Sequence[tuple[str, str]]
) -> tuple[list[Observed], dict[str, list[str | None]]]:
    """Task instances (REST API), the router's audit rows (REST event logs), external executor ids and the
    schedulers that queued them (SQL, and the schedulers' logs for their names), of the DAG runs ``runs``
    ((dag_id, run_id) in the order they were triggered); and each DAG's runs' final states, in that order."""
    observed: list[Observed] = []
    run_states: dict[str, list[str | None]] = {}
    schedulers = schedulers_by_job(stack)
    for dag_id, run_id in runs:
        run_states.setdefault(dag_id, []).append(stack.dag_run(dag_id, run_id)["state"])
        run = len(run_states[dag_id])
        audit = audit_rows(stack, dag_id, run_id)
        stored = stack.sql(
            "SELECT task_id, map_index, external_executor_id, queued_by_job_id FROM task_instance "
            "WHERE dag_id = ? AND run_id = ?",
            (dag_id, run_id),
        )
        external = {(task_id, map_index): value for task_id, map_index, value, _ in stored}
        queued_by = {(task_id, map_index): job for task_id, map_index, _, job in stored}
        for ti in sorted(stack.task_instances(dag_id, run_id), key=lambda t: (t["task_id"], t["map_index"])):
            key = (ti["task_id"], ti["map_index"])
            rows = [
                (event, extra)
                for (task_id, map_index, try_number, event, extra) in audit
                if (task_id, map_index) == key and try_number == ti["try_number"]
            ]
            runs_of_try = [extra for event, extra in rows if event in ROUTING_EVENTS]
            routed = next((extra for event, extra in rows if event == EVENT_ROUTED), {})
            fallbacks = [extra for event, extra in rows if event == EVENT_FALLBACK]
            observed.append(
                Observed(
                    dag_id=dag_id,
                    task_id=ti["task_id"],
                    map_index=ti["map_index"],
                    state=ti["state"],
                    try_number=ti["try_number"],
                    executors=[r.get("executor", "?") for r in runs_of_try],
                    rule=routed.get("rule"),
                    duration_source=routed.get("duration_source"),
                    how=[r.get("how", "?") for r in runs_of_try],
                    fallback_reasons=[r.get("reason", "?") for r in fallbacks],
                    fallback_details=[r.get("detail") or "" for r in fallbacks],
                    other_events=[
                        f"{event}: {json.dumps(extra, sort_keys=True)}"
                        for event, extra in rows
                        if event not in EXPECTED_EVENTS
                    ],
                    external_executor_id=external.get(key),
                    queued_to_running_s=_seconds_between(ti.get("queued_when"), ti.get("start_date")),
                    run_s=_seconds_between(ti.get("start_date"), ti.get("end_date")),
                    start_date=ti.get("start_date"),
                    end_date=ti.get("end_date"),
                    queued_by=_scheduler_name(queued_by.get(key), schedulers),
                    run=run,
                    run_id=run_id,
                    memory_mb=routed.get("memory_mb"),
                    memory_source=routed.get("memory_source"),
                    memory_basis=routed.get("memory_basis"),
                )
            )
    return observed, run_states


def schedulers_by_job(stack: AirflowStack) -> dict[int, str]:
    """Which scheduler process ran each scheduler job: a scheduler names its job in its log when it queues tasks."""
    found: dict[int, str] = {}
    for name in stack.scheduler_names:
        log = stack.process_log(name)
        text = log.read_text(errors="replace") if log.exists() else ""
        found.update((int(job), name) for job in set(re.findall(r"scheduler job_id=(\d+)\)", text)))
    return found


def _scheduler_name(job: int | None, schedulers: dict[int, str]) -> str | None:
    return None if job is None else schedulers.get(job, f"job {job}")


def audit_rows(
    stack: AirflowStack, dag_id: str, run_id: str
) -> list[tuple[str, int, int, str, dict[str, Any]]]:
    """The router's audit rows of one DAG run, oldest first: (task_id, map_index, try_number, event, extra)."""
    query = "&".join(
        [
            f"dag_id={dag_id}",
            f"run_id={quote(run_id, safe='')}",
            f"owner={AUDIT_OWNER}",
            "order_by=id",
            "limit=1000",
        ]
    )
    rows = stack.api("GET", f"/api/v2/eventLogs?{query}")["event_logs"]
    return [
        (row["task_id"], row["map_index"], row["try_number"], row["event"], json.loads(row["extra"] or "{}"))
        for row in rows
    ]

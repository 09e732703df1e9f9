"""``make demo`` end to end, and the parts of it that need no servers.

The end-to-end test runs ``python -m devtools.demo`` as ``make demo`` does: a real Airflow with the router, the
local Lambda service and moto's SQS. It checks the demo's verdict, then checks the same facts again straight from
the Airflow database the demo leaves behind, and that no process the demo started outlives it.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from demo_processes import processes_using

from devtools.demo.expected import (
    BIG_FUNCTION_MEMORY_MB,
    EXPECTED,
    EXPECTED_RUN_STATES,
    FAILURE_DAG,
    FUNCTION_MEMORY_MB,
    LAMBDA,
    LAMBDA_3G,
    LOCAL,
    MAIN_DAG,
    MEMORY_DAG,
    check,
    max_concurrent,
)
from devtools.demo.observed import Observed, observe
from devtools.demo.report import print_report
from devtools.demo.run import ROUTER, airflow_config
from devtools.demo.run import main as demo_main

REPO = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = 300


# -- the comparison with the declared expectations --------------------------------------------------------------


def _as_expected() -> list[Observed]:
    """Observations exactly as the declaration wants them (the burst: three on Lambda, five overflowed)."""
    observed = []
    for expected in EXPECTED:
        indexes = range(8) if expected.mapped else (-1,)
        for index in indexes:
            path = expected.paths[0] if not expected.mapped else ((LAMBDA,) if index < 3 else (LOCAL,))
            how = ["policy"] + (["fallback"] if len(path) > 1 else [])
            if expected.mapped and path == (LOCAL,):
                how = ["overflow"]
            observed.append(
                Observed(
                    dag_id=expected.dag_id,
                    task_id=expected.task_id,
                    map_index=index,
                    state=expected.state,
                    try_number=1,
                    executors=list(path),
                    rule=expected.rule,
                    duration_source="policy_default",
                    how=how,
                    fallback_reasons=[expected.fallback_reason] if expected.fallback_reason else [],
                    fallback_details=[""] if expected.fallback_reason else [],
                    other_events=[],
                    external_executor_id=f"{path[-1]}|some-id",
                    queued_to_running_s=0.5,
                    run_s=1.0,
                    run=expected.run,
                    memory_source=expected.memory_source or "policy_default",
                )
            )
    return observed


RUN_STATES = {MAIN_DAG: ["success"], FAILURE_DAG: ["failed"], MEMORY_DAG: ["success", "success"]}


def _problems(observed: list[Observed], run_states=RUN_STATES) -> list[str]:
    verdicts, general = check(EXPECTED, observed, run_states)
    return general + [f"{v.observed.label}: {p}" for v in verdicts for p in v.problems]


def _changed(task_id: str, run: int | None = None, **changes) -> list[Observed]:
    return [
        replace(o, **changes) if o.task_id == task_id and run in (None, o.run) else o for o in _as_expected()
    ]


def test_check_accepts_the_declared_outcomes():
    assert RUN_STATES == EXPECTED_RUN_STATES
    assert _problems(_as_expected()) == []


@pytest.mark.parametrize(
    ("observed", "problem"),
    [
        (
            _changed(
                "too_slow",
                executors=[LOCAL],
                how=["overflow"],
                fallback_reasons=[],
                fallback_details=[],
                external_executor_id="local",
            ),
            "too_slow: ran on local",
        ),
        (_changed("memory_hog", fallback_reasons=["timeout"]), "memory_hog: fallback reasons ['timeout']"),
        (
            # The second run died on the small function again: the router did not learn from the first.
            _changed(
                "memory_hog",
                run=2,
                executors=[LAMBDA, LAMBDA_3G],
                how=["policy", "fallback"],
                fallback_reasons=["out_of_memory"],
                memory_source="policy_default",
            ),
            "memory_hog: ran on lambda -> lambda_3g, expected lambda_3g",
        ),
        (
            _changed("memory_hog", run=2, memory_source="executor_config"),
            "memory_hog: memory from 'executor_config', expected 'out_of_memory'",
        ),
        (
            [o for o in _as_expected() if o.run == 1],
            "hybrid_router_demo_memory.memory_hog did not run in run 2",
        ),
        (
            _changed("long_task", executors=[LAMBDA], external_executor_id="lambda|x"),
            "long_task: ran on lambda",
        ),
        (_changed("short_task", state="failed"), "short_task: state 'failed'"),
        (_changed("pinned_task", rule="short and small"), "pinned_task: rule 'short and small'"),
        (_changed("too_slow", try_number=2), "too_slow: try 2"),
        (_changed("short_task", external_executor_id="local"), "short_task: external_executor_id 'local'"),
        (
            _changed(
                "fails_by_its_own_code",
                executors=[LAMBDA, LOCAL],
                fallback_reasons=["runtime_crash"],
                fallback_details=[""],
                external_executor_id="local",
            ),
            "fails_by_its_own_code: ran on lambda -> local",
        ),
        (
            _changed("too_slow", other_events=['hybrid_router.fallback_exhausted: {"reason": "timeout"}']),
            "too_slow: unexpected router events: hybrid_router.fallback_exhausted",
        ),
        (
            [o for o in _as_expected() if o.task_id != "short_task"],
            "hybrid_router_demo.short_task did not run",
        ),
        (
            _changed("burst", executors=[LAMBDA], how=["policy"], external_executor_id="lambda|x"),
            "no burst task overflowed",
        ),
        (
            _changed("burst", executors=[LOCAL], how=["overflow"], external_executor_id="local"),
            "no burst task ran on Lambda",
        ),
        (
            [
                replace(o, how=["policy"]) if o.task_id == "burst" and o.executors == [LOCAL] else o
                for o in _as_expected()
            ],
            "burst[3]: went to Local by ['policy'], expected an overflow",
        ),
    ],
)
def test_check_names_each_wrong_outcome(observed, problem):
    problems = _problems(observed)
    assert any(p.startswith(problem) for p in problems), problems


def test_check_requires_the_dag_runs_final_states():
    problems = _problems(_as_expected(), {**RUN_STATES, MAIN_DAG: ["failed"], MEMORY_DAG: ["success"]})
    assert problems == [
        f"DAG runs of {MAIN_DAG} ended ['failed'], expected ['success']",
        f"DAG runs of {MEMORY_DAG} ended ['success'], expected ['success', 'success']",
    ]


# -- examples/airflow.cfg ---------------------------------------------------------------------------------------


def _declared_options() -> dict[str, set[str]]:
    from hybrid_router.provider_info import get_provider_info

    return {section: set(spec["options"]) for section, spec in get_provider_info()["config"].items()}


def test_airflow_cfg_snippet_sets_only_declared_options_and_covers_what_the_demo_sets():
    text = (REPO / "examples" / "airflow.cfg").read_text()
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    assert parser.get("core", "executor") == ROUTER
    declared = _declared_options()
    for section in ("hybrid_router", "lambda_executor"):
        unknown = set(parser.options(section)) - declared[section]
        assert not unknown, f"[{section}] options not declared by the provider: {unknown}"
    demo_settings = airflow_config(
        policy=Path("policy.yaml"),
        results_queue_url="q",
        dead_letter_queue_url="dlq",
        signing_secret="s",
        lambda_endpoint_url="l",
        sqs_endpoint_url="e",
        local_log_dir=Path("logs"),
    )
    for section, options in demo_settings.items():
        for option in options:
            # Set, or shown commented out (the secret must not be written in the file).
            assert parser.has_option(section, option) or f"# {option} =" in text, f"[{section}] {option}"


# -- the demo itself ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_make_demo_routes_every_task_as_declared(tmp_path):
    output = tmp_path / "demo-output"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.demo", "--output", str(output)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the demo stops its servers on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = time.monotonic() - started
    print(out)  # shown by pytest when an assertion below fails
    home = output / "airflow-home"
    assert proc.returncode == 0, out[-6000:]
    assert "Total time:" in out and "airflow hybrid-router explain" in out
    assert processes_using(home) == []

    report = json.loads((output / "report.json").read_text())
    assert report["ok"] and report["problems"] == []
    assert report["dag_runs"] == RUN_STATES
    rows = {(t["dag_id"], t["label"], t["run"]): t for t in report["tasks"]}
    assert all(t["ok"] for t in rows.values()), [t for t in rows.values() if not t["ok"]]
    assert rows[(MAIN_DAG, "too_slow", 1)]["executors"] == [LAMBDA, LOCAL]
    assert rows[(MEMORY_DAG, "memory_hog", 1)]["executors"] == [LAMBDA, LAMBDA_3G]
    assert rows[(MEMORY_DAG, "memory_hog", 2)]["executors"] == [LAMBDA_3G]
    learned = f"more than {FUNCTION_MEMORY_MB} MB: out of memory on {LAMBDA} at "
    assert rows[(MEMORY_DAG, "memory_hog", 2)]["memory_basis"].startswith(learned)
    assert f"hybrid_router_demo_memory.memory_hog, run 2: routed by memory {learned}" in out
    # explain, run by the demo after both runs: the bigger function, and the learned need with its source.
    explanation = report["explain"]
    assert explanation["returncode"] == 0, explanation["errors"]
    assert explanation["output"].splitlines()[0] == f"{MEMORY_DAG}.memory_hog -> {LAMBDA_3G}"
    assert f"  memory:     {learned}" in explanation["output"]
    assert f"$ {explanation['command']}" in out
    assert report["timings_s"]["total"] <= elapsed
    # simulate --compare on the demo's history: both policies side by side, and the HTML report with its charts.
    simulation = report["simulation"]
    assert simulation["returncode"] == 0, simulation["errors"]
    assert "policy-one-size.yaml" in simulation["output"] and "simulate --from-db" in out
    # too_slow timed out on lambda: the policy that sends it there expects fallbacks, the one-size one none.
    fallbacks = re.search(r"^fallbacks +([\d.]+) +([\d.]+)$", simulation["output"], re.MULTILINE)
    assert fallbacks and float(fallbacks[1]) > 0 and float(fallbacks[2]) == 0, simulation["output"]
    html = (output / "simulate.html").read_text()
    assert "<svg" in html and "<script" not in html

    # The same facts once more, from the database the demo's Airflow wrote, not from the demo's report.
    with sqlite3.connect(home / "airflow.db") as db:
        # Each task's instances, in the order of their DAG's runs (a manual run's id starts with its date).
        tis: dict[tuple[str, str, int], list[tuple[str, int, str]]] = {}
        for dag_id, task_id, map_index, state, try_number, external in db.execute(
            "SELECT dag_id, task_id, map_index, state, try_number, external_executor_id FROM task_instance "
            "ORDER BY run_id"
        ):
            tis.setdefault((dag_id, task_id, map_index), []).append((state, try_number, external))
        audit = [
            (task_id, map_index, event, json.loads(extra))
            for task_id, map_index, event, extra in db.execute(
                "SELECT task_id, map_index, event, extra FROM log WHERE owner = 'hybrid_router' ORDER BY id"
            )
        ]
    tis_once = {key: runs[0] for key, runs in tis.items() if len(runs) == 1}
    (state, try_number, external) = tis_once[(MAIN_DAG, "too_slow", -1)]
    assert (state, try_number) == ("success", 1) and external.startswith(LOCAL)
    fallbacks = [e for t, _, ev, e in audit if t == "too_slow" and ev == "hybrid_router.fallback"]
    assert [(e["failed_on"], e["executor"], e["reason"]) for e in fallbacks] == [(LAMBDA, LOCAL, "timeout")]
    # The hog: out of memory on the small function, the same try on the big one; its next run went there directly.
    hog_runs = tis[(MEMORY_DAG, "memory_hog", -1)]
    assert [(state, try_number) for state, try_number, _ in hog_runs] == [("success", 1), ("success", 1)]
    assert all(
        external.startswith(f"{LAMBDA_3G}@1|lambda:hybrid-router-demo-3g:") for *_, external in hog_runs
    )
    fallbacks = [e for t, _, ev, e in audit if t == "memory_hog" and ev == "hybrid_router.fallback"]
    assert [(e["failed_on"], e["executor"], e["reason"]) for e in fallbacks] == [
        (LAMBDA, LAMBDA_3G, "out_of_memory")
    ]
    # The router's id names the child and the try it ran, then the child's own id (router/external_id.py).
    assert tis_once[(MAIN_DAG, "long_task", -1)][2] == f"{LOCAL}@1"
    assert tis_once[(MAIN_DAG, "short_task", -1)][2].startswith(f"{LAMBDA}@1|lambda:")
    assert tis_once[(FAILURE_DAG, "fails_by_its_own_code", -1)][:2] == ("failed", 1)
    # Beside its routing, a run that failed by its own code leaves only the row of what it used (once the router
    # heard of it, which can be after the demo stopped).
    own_failure = {
        (ev, e.get("outcome"))
        for t, _, ev, e in audit
        if t == "fails_by_its_own_code" and ev != "hybrid_router.routed"
    }
    assert own_failure <= {("hybrid_router.run_finished", "failed")}
    # The hog's run on the small function died at its size, which is what its row says it needed at least; on
    # the big one it used more than the small one has.
    hog_finished = [
        (e["executor"], e["outcome"], e["memory_size_mb"], e["peak_mb"])
        for t, _, ev, e in audit
        if t == "memory_hog" and ev == "hybrid_router.run_finished"
    ]
    assert hog_finished[0] == (LAMBDA, "out_of_memory", FUNCTION_MEMORY_MB, FUNCTION_MEMORY_MB)
    assert [row[:3] for row in hog_finished[1:]] == [(LAMBDA_3G, "success", BIG_FUNCTION_MEMORY_MB)] * 2
    assert all(row[3] > FUNCTION_MEMORY_MB for row in hog_finished[1:])
    overflowed = [e for t, _, ev, e in audit if t == "burst" and e.get("how") == "overflow"]
    assert overflowed and all(e["overflow_from"] == LAMBDA and e["executor"] == LOCAL for e in overflowed)


# -- reading Airflow's records -----------------------------------------------------------------------------------


class _RecordedAirflow:
    """Answers the calls ``observe`` makes with records shaped as Airflow's REST API and database give them."""

    scheduler_names = ["scheduler-1", "scheduler-2"]

    def __init__(self, log_dir: Path):
        self.queries: list[str] = []
        self.log_dir = log_dir
        # What each scheduler logs when it queues tasks: the name of its job.
        (log_dir / "scheduler-2.log").write_text(
            "Setting the following tasks to queued state (scheduler job_id=7):\n\t<TaskInstance: too_slow>\n"
        )

    def process_log(self, name):
        return self.log_dir / f"{name}.log"

    def dag_run(self, dag_id, run_id):
        return {"state": "success"}

    def task_instances(self, dag_id, run_id):
        return [
            {
                "task_id": "too_slow",
                "map_index": -1,
                "state": "success",
                "try_number": 1,
                "queued_when": "2026-01-01T00:00:30.000000Z",
                "start_date": "2026-01-01T00:00:30.250000Z",
                "end_date": "2026-01-01T00:01:02.250000Z",
            }
        ]

    def sql(self, query, params):
        return [("too_slow", -1, "local", 7)]

    def api(self, method, path):
        self.queries.append(path)
        row = {"task_id": "too_slow", "map_index": -1, "try_number": 1}
        routed = {"executor": "lambda", "how": "policy", "rule": "short and small", "duration_source": "x"}
        fallback = {"executor": "local", "how": "fallback", "rule": "short and small", "reason": "timeout"}
        given_up = {"failed_on": "local", "reason": "timeout"}
        return {
            "event_logs": [
                {**row, "event": "hybrid_router.routed", "extra": json.dumps(routed)},
                {**row, "event": "hybrid_router.fallback", "extra": json.dumps(fallback)},
                {**row, "try_number": 0, "event": "hybrid_router.routed", "extra": json.dumps(routed)},
                {**row, "event": "hybrid_router.fallback_exhausted", "extra": json.dumps(given_up)},
            ]
        }


def test_observe_reads_the_route_of_each_try_from_the_audit_rows(tmp_path):
    airflow = _RecordedAirflow(tmp_path)
    observed, run_states = observe(airflow, [(MAIN_DAG, "manual__2026-01-01T00:00:00+00:00")])
    assert run_states == {MAIN_DAG: ["success"]}
    (seen,) = observed
    assert seen.executors == [LAMBDA, LOCAL]  # the row of another try is not part of this one's route
    assert (seen.rule, seen.how, seen.fallback_reasons) == (
        "short and small",
        ["policy", "fallback"],
        ["timeout"],
    )
    assert seen.other_events == [
        'hybrid_router.fallback_exhausted: {"failed_on": "local", "reason": "timeout"}'
    ]
    assert (seen.external_executor_id, seen.queued_to_running_s, seen.run_s) == ("local", 0.25, 32.0)
    assert seen.queued_by == "scheduler-2"  # job 7, named in that scheduler's log
    assert "run_id=manual__2026-01-01T00%3A00%3A00%2B00%3A00" in airflow.queries[0]


def test_several_schedulers_need_postgres_and_are_refused_before_anything_starts(capsys):
    with pytest.raises(SystemExit) as exited:
        demo_main(["--schedulers", "2"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--schedulers 2 needs --postgres: SQLite allows one scheduler only" in err
    assert 'make demo DEMO_ARGS="--postgres --schedulers 2"' in err


def test_the_report_says_which_scheduler_queued_each_task_when_there_are_several(capsys):
    verdicts, general = check(EXPECTED, _as_expected(), RUN_STATES)
    verdicts[0].observed.queued_by = "scheduler-2"
    print_report(verdicts, general, by_scheduler=True)
    out = capsys.readouterr().out
    assert "queued by" in out and "scheduler-2" in out
    assert f"Tasks queued per scheduler: ?: {len(verdicts) - 1}, scheduler-2: 1" in out
    print_report(verdicts, general)  # one scheduler: the table of plain `make demo`
    assert "queued by" not in capsys.readouterr().out


def _run(start: int, end: int, executors=(LAMBDA,)) -> Observed:
    stamp = "2026-01-01T00:00:{:02d}Z".format
    return replace(_as_expected()[0], executors=list(executors), start_date=stamp(start), end_date=stamp(end))


def test_max_concurrent_counts_overlapping_runs_only():
    assert max_concurrent([_run(0, 10), _run(5, 15), _run(9, 12), _run(10, 20)]) == 3
    assert max_concurrent([_run(0, 5), _run(5, 10)]) == 1  # back to back
    assert max_concurrent([]) == 0


def test_check_reports_more_lambda_runs_at_once_than_the_reserved_concurrency():
    observed = _as_expected()
    lambda_only = [i for i, o in enumerate(observed) if o.executors == [LAMBDA]][:4]
    for n, i in enumerate(lambda_only):
        observed[i] = replace(
            observed[i], start_date=f"2026-01-01T00:00:0{n}Z", end_date="2026-01-01T00:00:30Z"
        )
    assert "4 tasks ran on Lambda at once, more than its reserved concurrency 3" in _problems(observed)
    observed[lambda_only[0]] = replace(observed[lambda_only[0]], end_date="2026-01-01T00:00:01Z")
    assert _problems(observed) == []


def test_demo_policy_is_valid_without_warnings_and_routes_the_demo_tasks_as_declared():
    from datetime import datetime, timezone

    from hybrid_router.router.policy import load_policy, resolve_facts
    from hybrid_router.router.policy.facts import MemoryEvidence, OutOfMemory

    policy = load_policy(REPO / "examples" / "policy.yaml")
    assert [str(w) for w in policy.warnings] == []
    assert set(policy.executors) == {LAMBDA, LAMBDA_3G, LOCAL}
    compared = load_policy(REPO / "examples" / "policy-one-size.yaml")  # simulate --compare's other policy
    assert [str(w) for w in compared.warnings] == []

    def route(dag_id: str = MAIN_DAG, **facts) -> tuple[str, str]:
        decision = policy.decide(resolve_facts(dag_id=dag_id, **facts))
        return decision.executor, decision.rule

    # The facts the router resolves for each demo task (the DAG's hints), against the declared rule and first stop.
    declared = {(e.task_id, e.run): (e.paths[0][0], e.rule) for e in EXPECTED}
    assert route(task_id="short_task") == declared[("short_task", 1)]
    assert route(task_id="pinned_task", queue="lambda") == declared[("pinned_task", 1)]
    assert (
        route(task_id="long_task", executor_config={"hybrid_router": {"expected_duration": "40m"}})
        == (declared[("long_task", 1)])
    )
    assert (
        route(task_id="too_slow", executor_config={"hybrid_router": {"expected_duration": "1m"}})
        == (declared[("too_slow", 1)])
    )
    assert route(MEMORY_DAG, task_id="memory_hog") == declared[("memory_hog", 1)]
    died = OutOfMemory(FUNCTION_MEMORY_MB, LAMBDA, datetime.now(timezone.utc))
    learned = MemoryEvidence(out_of_memory=died)
    assert route(MEMORY_DAG, task_id="memory_hog", memory=lambda *_: learned) == declared[("memory_hog", 2)]

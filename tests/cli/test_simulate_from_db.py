"""``simulate --from-db --compare`` and ``recommend --from-db`` on a migrated SQLite metadata database holding task
instances and the router's own audit rows (hand-overs and measured runs), through ``python -m hybrid_router``."""

from __future__ import annotations

import json
import textwrap
from datetime import timedelta

import pytest

from hybrid_router.router.audit import EVENT_FALLBACK, EVENT_ROUTED, EVENT_RUN_FINISHED
from hybrid_router.router.policy import load_policy_text

from .cli_runner import run_module

# "small" is billed as a 512 MB function but has no memory limit, so the policy sends every task there
SMALL_LAMBDA = textwrap.dedent(
    """\
    version: 1
    executors:
      lambda:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m}
        options: {function_name: airflow-task}
      local: {class: LocalExecutor}
    defaults: {expected_duration: 5m, memory_mb: 256, run_on: local}
    pricing:
      executors:
        lambda: {memory_mb: 512}
    rules:
      - name: short
        if: {expected_duration: "< 12m"}
        run_on: lambda
        fallback: [local]
    """
)
# "sized" learns the memory need and picks the function that fits it
SIZED = textwrap.dedent(
    """\
    version: 1
    executors:
      lambda:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 512}
        options: {function_name: airflow-task}
      lambda_1g:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 1024}
        options: {function_name: airflow-task-1g}
      local: {class: LocalExecutor}
    defaults: {expected_duration: 5m, memory_mb: 256, run_on: local}
    settings: {memory_headroom: 1.2, learn_after_runs: 5}
    rules:
      - name: short
        if: {expected_duration: "< 12m"}
        run_on: [lambda, lambda_1g]
        fallback: {out_of_memory: [lambda_1g, local], default: [local]}
    """
)
PRICES = "executors:\n  local: {slot_hour_usd: 0.1}\n"
GB_SECOND, REQUEST = 0.0000166667, 0.0000002


@pytest.fixture
def history(runs, audit_rows):
    """etl.small: 10 tries of 30 s handed to lambda 2 s before they started; the last one ran out of memory on
    the 512 MB function and ran again on local (handed over 1 s before it started). etl.long: 3 tries of 20 min
    on local, 0.8 s to start each."""
    for number in range(10):
        run = runs.add("etl", "small", 30, ended_ago=timedelta(hours=1, minutes=number))
        start = run["start_date"]
        if number < 9:
            audit_rows.add(EVENT_ROUTED, run, start - timedelta(seconds=2), executor="lambda")
            audit_rows.add(EVENT_RUN_FINISHED, run, run["end_date"], **_finished("lambda", "success", 300))
            continue
        audit_rows.add(EVENT_ROUTED, run, start - timedelta(seconds=40), executor="lambda")
        audit_rows.add(
            EVENT_RUN_FINISHED, run, start - timedelta(seconds=5), **_finished("lambda", "out_of_memory", 512)
        )
        audit_rows.add(
            EVENT_FALLBACK, run, start - timedelta(seconds=1), executor="local", reason="out_of_memory"
        )
        audit_rows.add(EVENT_RUN_FINISHED, run, run["end_date"], **_finished("local", "success", None))
    for number in range(3):
        run = runs.add("etl", "long", 20 * 60, ended_ago=timedelta(hours=2, minutes=number))
        audit_rows.add(EVENT_ROUTED, run, run["start_date"] - timedelta(seconds=0.8), executor="local")
        audit_rows.add(EVENT_RUN_FINISHED, run, run["end_date"], **_finished("local", "success", None))


def _finished(executor: str, outcome: str, peak: int | None) -> dict:
    size = 512 if executor == "lambda" else None
    return {
        "executor": executor,
        "outcome": outcome,
        "memory_size_mb": size,
        "peak_mb": peak,
        "duration_ms": 30_000 if outcome == "success" else None,
        "billed_ms": None,
    }


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in (("small.yaml", SMALL_LAMBDA), ("sized.yaml", SIZED), ("prices.yaml", PRICES)):
        paths[name] = tmp_path / name
        paths[name].write_text(text)
    return paths


def test_simulate_from_db_compares_two_policies_with_measured_latency_and_failures(
    history, files, metadata_db, tmp_path
):
    report_path = tmp_path / "report.html"
    env = metadata_db.env()
    result = run_module(
        "simulate", "--from-db", "--days", "2",
        "--policy", str(files["small.yaml"]), "--compare", str(files["sized.yaml"]),
        "--prices", str(files["prices.yaml"]), "--html", str(report_path), "--json",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    small, sized = json.loads(result.stdout)
    assert (small["policy"], sized["policy"]) == (str(files["small.yaml"]), str(files["sized.yaml"]))
    assert small["tasks"] == sized["tasks"] == 13

    # start latency from the hand-overs: lambda 2 s (9 tries; the 10th ran on local after a fallback),
    # local (0.8 x 3 + 1) / 4 s
    lambda_s, local_s = 2.0, (0.8 * 3 + 1.0) / 4
    # small.yaml: the 512 MB function killed 1 of small's 11 measured runs, so 10/11 of a run falls back
    fallbacks = 10 / 11
    assert small["fallbacks"] == pytest.approx(fallbacks, abs=1e-3)
    assert small["fallbacks_by_reason"] == {"out_of_memory": pytest.approx(fallbacks, abs=1e-3)}
    assert small["start_latency_s"] == pytest.approx(
        10 * lambda_s + 3 * local_s + fallbacks * local_s, abs=1e-2
    )
    slot = 0.1 / 3600
    small_cost = 10 * (REQUEST + 30 * 0.5 * GB_SECOND) + 3 * 1200 * slot + fallbacks * 30 * slot
    assert small["cost_usd"] == pytest.approx(small_cost, rel=1e-4)
    assert small["task_hours"] == pytest.approx((300 + 3600 + fallbacks * 30) / 3600, abs=1e-3)

    # sized.yaml learned from the out-of-memory death: lambda_1g, no fallback; no start measured there
    assert sized["executors"]["lambda_1g"]["tasks"] == 10
    assert sized["fallbacks"] == 0
    assert sized["start_latency_s"] == pytest.approx(10 * 1.0 + 3 * local_s, abs=1e-2)
    assert sized["cost_usd"] == pytest.approx(
        10 * (REQUEST + 30 * 1.0 * GB_SECOND) + 3 * 1200 * slot, rel=1e-4
    )
    assert any("lambda_1g" in note and "assumed" in note for note in sized["notes"])
    assert small["prices"]["region"] == "us-east-1"

    html_text = report_path.read_text()
    assert str(files["small.yaml"]) in html_text and "<svg" in html_text
    assert "<script" not in html_text.lower()

    text = run_module(
        "simulate", "--from-db", "--days", "2",
        "--policy", str(files["small.yaml"]), "--compare", str(files["sized.yaml"]),
        env=env,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("Compared on 13 task runs (2 rows, metadata database, last 2 days)")
    fallback_row = next(line for line in lines if line.startswith("fallbacks"))
    assert fallback_row.split()[1:] == [f"{fallbacks:.1f}", "0.0"]


def test_recommend_from_db_proposes_a_function_that_fits_and_the_proposal_loads(history, files, metadata_db):
    result = run_module(
        "recommend", "--from-db", "--days", "2",
        "--policy", str(files["small.yaml"]), "--prices", str(files["prices.yaml"]), "--json",
        env=metadata_db.env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    proposal = json.loads(result.stdout)
    by_task = {item["task_id"]: item for item in proposal["tasks"]}
    # small ran out of memory on 512 MB: it needs more, and the 1,024 MB function is the cheapest that fits
    assert by_task["small"]["memory_need_mb"] == 513
    assert (by_task["small"]["current"], by_task["small"]["proposed"]) == ("lambda", "lambda_1024mb")
    assert by_task["small"]["new_executor"] is True
    # 20 minutes: too long for any Lambda function, and local is where it runs today
    assert by_task["long"]["proposed"] == "local"

    policy = load_policy_text(proposal["proposal"], "proposal.yaml")
    assert policy.rules[0].name == "recommended: etl.small"
    assert policy.rules[0].run_on == ("lambda_1024mb",)
    assert policy.executors["lambda_1024mb"].limits.max_memory_mb == 1024
    assert policy.pricing == {"executors": {"lambda": {"memory_mb": 512}}}  # the policy's own, kept

"""``python -m hybrid_router validate | explain | simulate``: output, exit codes, and the shipped examples."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

from hybrid_router.policies import DEFAULT_POLICY
from hybrid_router.router.cli import EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from hybrid_router.router.policy import TaskFacts, load_policy
from hybrid_router.router.simulate import read_tasks_csv

from .cli_runner import EXAMPLE_TASKS, REPO_ROOT, run_module

EXAMPLE_POLICY = REPO_ROOT / "examples" / "policy.yaml"
ISSUE_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<path>\S+): (?P<message>.+)$")

BROKEN_POLICY = textwrap.dedent(
    """\
    version: 1
    executors:
      lambda:
        class: hybrid_router.lambda_exec.LambdaExecutor
      local: {class: LocalExecutor}
    rules:
      - name: short
        if: {expected_duration: "< 12 parsecs"}
        run_on: lambda
      - name: nowhere
        run_on: lamda
    """
)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def broken_policy(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN_POLICY)
    return path


# validate --------------------------------------------------------------------------------------------


def test_validate_accepts_the_shipped_policies():
    # through the real entry point, as a user runs it
    result = run_module("validate", str(DEFAULT_POLICY), str(EXAMPLE_POLICY))
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert f"{DEFAULT_POLICY}: valid" in result.stdout
    assert f"{EXAMPLE_POLICY}: valid" in result.stdout


def test_validate_lists_every_error_with_its_line(capsys, broken_policy):
    code, out, _ = run(capsys, "validate", str(broken_policy))
    assert code == EXIT_INVALID
    issues = [
        ISSUE_LINE.match(line) for line in out.splitlines() if not line.endswith(" error(s), 0 warning(s)")
    ]
    issues = [match for match in issues if match and not match.group("message").endswith("(warning)")]
    assert {int(match.group("line")) for match in issues} >= {8, 11}, out
    assert all(match.group("file") == str(broken_policy) for match in issues)
    by_line = {int(match.group("line")): match for match in issues}
    assert "parsecs" in by_line[8].group("message")
    assert "lamda" in by_line[11].group("message")
    assert out.splitlines()[-1].startswith(f"{broken_policy}: invalid, ")


def test_validate_checks_every_file_and_fails_if_any_fails(capsys, broken_policy, tmp_path):
    code, out, _ = run(
        capsys, "validate", str(DEFAULT_POLICY), str(tmp_path / "missing.yaml"), str(broken_policy)
    )
    assert code == EXIT_INVALID
    assert f"{DEFAULT_POLICY}: valid" in out
    assert f"{tmp_path / 'missing.yaml'}:1:1: (document): cannot read the file" in out
    assert f"{broken_policy}: invalid" in out


def test_usage_errors_exit_2(capsys):
    assert main(["validate"]) == EXIT_USAGE
    assert main(["explain", "--policy", str(DEFAULT_POLICY), "--dag-id", "d"]) == EXIT_USAGE
    code = main(
        [
            "explain",
            "--policy",
            str(DEFAULT_POLICY),
            "--dag-id",
            "d",
            "--task-id",
            "t",
            "--expected-duration",
            "soon",
        ]
    )
    assert code == EXIT_USAGE
    assert "invalid duration 'soon'" in capsys.readouterr().err
    assert main(["simulate", "--policy", str(DEFAULT_POLICY), "--tasks", "x.csv", "--from-db"]) == EXIT_USAGE
    assert main(["simulate", "--policy", str(DEFAULT_POLICY)]) == EXIT_USAGE


# explain ---------------------------------------------------------------------------------------------


def explain_json(capsys, *extra: str, policy=DEFAULT_POLICY, task_id="t") -> dict:
    code, out, err = run(
        capsys, "explain", "--policy", str(policy), "--dag-id", "d", "--task-id", task_id, *extra, "--json"
    )
    assert code == EXIT_OK, err
    return json.loads(out)


def expected_decision(**facts):
    """The decision the policy engine itself makes: the CLI must show it, not one of its own."""
    return load_policy(DEFAULT_POLICY).decide(TaskFacts(dag_id="d", task_id="t", **facts))


@pytest.mark.parametrize(
    ("args", "facts", "executor", "rule"),
    [
        (
            ("--queue", "lambda", "--expected-duration", "1m"),
            {"queue": "lambda", "expected_duration_s": 60.0},
            "lambda",
            "pinned to lambda by queue",
        ),
        (("--expected-duration", "5m"), {"expected_duration_s": 300.0}, "lambda", "short and small"),
        (("--expected-duration", "40m"), {"expected_duration_s": 2400.0}, "local", "everything else"),
        (
            ("--expected-duration", "2m", "--memory-mb", "12GB"),
            {"expected_duration_s": 120.0, "memory_mb": 12288},
            "local",
            "everything else",
        ),
        (
            # pinned by queue but longer than Lambda's 15 minutes: never sent there
            ("--queue", "lambda", "--expected-duration", "40m"),
            {"queue": "lambda", "expected_duration_s": 2400.0},
            "local",
            "everything else",
        ),
    ],
    ids=["queue-pinned", "5-minute", "40-minute", "12GB", "queue-pinned-but-40-minute"],
)
def test_explain_json_on_the_default_policy(capsys, args, facts, executor, rule):
    result = explain_json(capsys, *args)
    assert {
        "executor",
        "rule",
        "overflow",
        "fallback",
        "reasons",
        "expected_duration_s",
        "duration_source",
        "memory_mb",
    } <= set(result)
    assert (result["executor"], result["rule"]) == (executor, rule)
    assert result["reasons"] and all(isinstance(reason, str) and reason for reason in result["reasons"])
    decision = expected_decision(**facts)
    assert (result["executor"], result["rule"]) == (decision.executor, decision.rule)
    assert result["expected_duration_s"] == facts["expected_duration_s"]
    assert result["duration_source"] == "command_line"
    if "memory_mb" in facts:
        assert (result["memory_mb"], result["memory_source"]) == (facts["memory_mb"], "command_line")


def test_explain_text_names_the_rule_and_its_line(capsys):
    code, out, _ = run(
        capsys,
        "explain",
        "--policy",
        str(EXAMPLE_POLICY),
        "--dag-id",
        "d",
        "--task-id",
        "t",
        "--queue",
        "lambda",
        "--expected-duration",
        "30s",
    )
    assert code == EXIT_OK
    assert out.splitlines()[0] == "d.t -> lambda"
    line = next(
        i
        for i, text in enumerate(EXAMPLE_POLICY.read_text().splitlines(), 1)
        if "pinned to lambda by queue" in text
    )
    assert f"rule 'pinned to lambda by queue' at {EXAMPLE_POLICY}:{line}" in out
    assert "why:" in out


def test_explain_with_an_invalid_policy_exits_1(capsys, broken_policy):
    code, _, err = run(
        capsys,
        "explain",
        "--policy",
        str(broken_policy),
        "--dag-id",
        "d",
        "--task-id",
        "t",
        "--expected-duration",
        "1m",
    )
    assert code == EXIT_INVALID
    assert f"{broken_policy}:11:" in err


SIZED_POLICY = textwrap.dedent(
    """\
    version: 1
    executors:
      lambda:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 512}
      lambda_3g:
        class: hybrid_router.lambda_exec.LambdaExecutor
        limits: {max_duration: 15m, max_memory_mb: 3072}
      local: {class: LocalExecutor}
    defaults: {run_on: local}
    rules:
      - name: sized
        if: {expected_duration: "< 12m"}
        run_on: [lambda, lambda_3g]
        fallback: {out_of_memory: [lambda_3g, local], timeout: local, default: [local]}
      - name: everything else
        run_on: local
    """
)


def test_explain_shows_the_run_on_entry_chosen_and_the_fallback_lists_by_reason(capsys, tmp_path):
    policy = tmp_path / "sized.yaml"
    policy.write_text(SIZED_POLICY)
    args = ("--policy", str(policy), "--dag-id", "d", "--task-id", "t", "--expected-duration", "1m")
    code, out, err = run(capsys, "explain", *args, "--memory-mb", "600")
    assert code == EXIT_OK, err
    assert out.splitlines()[0] == "d.t -> lambda_3g"
    assert "  fallback:   out_of_memory: local; timeout: local; any other reason: local" in out
    assert "  memory:     600 MB from command_line" in out
    assert "rule 'sized' passes over lambda: memory 600 MB exceeds lambda's max_memory_mb 512" in out
    small = explain_json(capsys, "--expected-duration", "1m", "--memory-mb", "100", policy=policy)
    assert small["executor"] == "lambda"
    assert small["fallback_by_reason"] == {"out_of_memory": ["lambda_3g", "local"], "timeout": ["local"]}


def test_explain_text_says_where_a_measured_memory_figure_came_from():
    from datetime import datetime, timezone

    from hybrid_router.router.cli_commands import _memory_text
    from hybrid_router.router.policy import MemoryEvidence, OutOfMemory, load_policy_text

    policy = load_policy_text(SIZED_POLICY)
    p95 = policy.decide(TaskFacts("d", "t", memory_evidence=MemoryEvidence(14, 1520.0))).to_dict()
    assert _memory_text(p95) == "1,824 MB: p95 of 14 runs x 1.2"
    oom = OutOfMemory(512, "lambda", datetime(2026, 3, 2, 10, 15, tzinfo=timezone.utc))
    died = policy.decide(TaskFacts("d", "t", memory_evidence=MemoryEvidence(out_of_memory=oom))).to_dict()
    assert _memory_text(died) == "more than 512 MB: out of memory on lambda at 2026-03-02 10:15:00 UTC"
    assert died["executor"] == "lambda_3g"


# simulate --------------------------------------------------------------------------------------------


def test_simulate_the_example_task_table(capsys):
    rows = read_tasks_csv(EXAMPLE_TASKS)
    policy = load_policy(EXAMPLE_POLICY)
    code, out, err = run(
        capsys, "simulate", "--policy", str(EXAMPLE_POLICY), "--tasks", str(EXAMPLE_TASKS), "--json"
    )
    assert code == EXIT_OK, err
    report = json.loads(out)

    assert report["tasks"] == sum(row.count for row in rows)
    assert report["rows"] == len(rows)
    # recompute the expected split from the engine's own decisions
    expected_tasks: dict[str, int] = {}
    expected_hours: dict[str, float] = {}
    for row in rows:
        decision = policy.decide(row.facts)
        expected_tasks[decision.executor] = expected_tasks.get(decision.executor, 0) + row.count
        expected_hours[decision.executor] = (
            expected_hours.get(decision.executor, 0) + row.count * decision.expected_duration_s / 3600
        )
    assert {name: load["tasks"] for name, load in report["executors"].items()} == expected_tasks
    for name, load in report["executors"].items():
        assert load["task_hours"] == pytest.approx(expected_hours[name], abs=1e-3)
    assert sum(rule["hits"] for rule in report["rules"]) + report["unmatched"] == report["tasks"]
    assert report["never_fired"] == [rule["name"] for rule in report["rules"] if rule["hits"] == 0]
    # only etl_orders.notify (96 runs) is pinned by queue
    assert report["rules"][0]["hits"] == 96


def test_simulate_text_report(capsys, tmp_path):
    tasks = tmp_path / "tasks.csv"
    tasks.write_text("dag_id,task_id,queue,duration,count\nd,quick,lambda,1m,10\nd,slow,,3h,2\n")
    code, out, _ = run(capsys, "simulate", "--policy", str(EXAMPLE_POLICY), "--tasks", str(tasks))
    assert code == EXIT_OK
    assert out.startswith(f"Routed 12 task runs (2 rows, {tasks}) with {EXAMPLE_POLICY}")
    table = {
        line.split()[0]: line.split()[1:3]  # then cost $, start latency, fallback runs
        for line in out.splitlines()
        if line.split() and line.split()[0] in ("lambda", "local")
    }
    assert table["lambda"] == ["10", f"{10 / 60:.2f}"]
    assert table["local"] == ["2", "6.00"]
    assert "Rules that never fire:" in out
    assert "short and small" in out.split("Rules that never fire:")[1]


def test_simulate_reports_every_bad_row_with_file_and_line(capsys, tmp_path):
    tasks = tmp_path / "tasks.csv"
    tasks.write_text(
        "dag_id,task_id,duration,memory_mb,count\n"
        "d,ok,5m,512,1\n"
        "d,bad_duration,5 fortnights,,1\n"
        "d,,1m,,1\n"
        "d,bad_count,1m,,zero\n"
        "d,too_many,1m,,1,extra\n"
    )
    code, _, err = run(capsys, "simulate", "--policy", str(EXAMPLE_POLICY), "--tasks", str(tasks))
    assert code == EXIT_INVALID
    lines = err.splitlines()
    assert lines[0].startswith(f"{tasks}:3: duration: ")
    assert lines[1] == f"{tasks}:4: task_id: must not be empty"
    assert lines[2].startswith(f"{tasks}:5: count: ")
    assert lines[3] == f"{tasks}:6: 1 more cells than the header has columns"
    assert len(lines) == 4


def test_simulate_rejects_unknown_columns(capsys, tmp_path):
    tasks = tmp_path / "tasks.csv"
    tasks.write_text("dag_id,task,durations\nd,t,5m\n")
    code, _, err = run(capsys, "simulate", "--policy", str(EXAMPLE_POLICY), "--tasks", str(tasks))
    assert code == EXIT_INVALID
    assert f"{tasks}:1: task_id: missing column" in err
    assert f"{tasks}:1: durations: unknown column" in err


def test_validate_and_explain_need_no_airflow():
    # `python -m hybrid_router` must work where Airflow is not configured (a laptop, a CI lint job) when the
    # command line gives every figure the database would otherwise be asked for
    code = (
        "import sys\n"
        "from hybrid_router.router.cli import main\n"
        f"assert main(['validate', {str(DEFAULT_POLICY)!r}]) == 0\n"
        f"assert main(['explain', '--policy', {str(DEFAULT_POLICY)!r}, '--dag-id', 'd', '--task-id', 't',"
        " '--expected-duration', '5m', '--memory-mb', '512', '--json']) == 0\n"
        "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_explain_says_why_earlier_rules_did_not_take_the_task(capsys):
    result = explain_json(capsys, "--expected-duration", "40m")
    passed_over = [
        reason for reason in result["reasons"] if "does not match" in reason or "skipped" in reason
    ]
    assert any("'pinned to lambda by queue'" in reason for reason in passed_over), result["reasons"]
    assert any("'short and small'" in reason and "40m" in reason for reason in passed_over), result["reasons"]

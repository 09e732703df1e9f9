"""Through real Airflow processes: the provider's config section, ``airflow hybrid-router``, and the history in a
migrated metadata database. Each ``airflow`` start costs 1-2 s, so the checks are grouped into few processes."""

from __future__ import annotations

import json
import subprocess
import sys

from hybrid_router.policies import DEFAULT_POLICY

from .cli_runner import REPO_ROOT, airflow_env, run_module

EXAMPLE_POLICY = REPO_ROOT / "examples" / "policy.yaml"
AIRFLOW = [sys.executable, "-m", "airflow"]


def airflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=120)


def test_config_section_defaults_and_environment_override(tmp_path):
    env = airflow_env(tmp_path)
    listed = airflow("config", "list", "--section", "hybrid_router", "--show-values", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "[hybrid_router]" in listed.stdout
    for line in (
        "reload_interval = 30",
        "history_days = 14",
        "history_cache_ttl = 300",
        "history_min_runs = 3",
    ):
        assert line in listed.stdout
    # {AIRFLOW_HOME} in the default is expanded
    assert f"policy_file = {tmp_path}/hybrid_router_policy.yaml" in listed.stdout

    default = airflow("config", "get-value", "hybrid_router", "reload_interval", env=env)
    assert default.stdout.strip() == "30", default.stderr
    overridden = airflow(
        "config",
        "get-value",
        "hybrid_router",
        "reload_interval",
        env={**env, "AIRFLOW__HYBRID_ROUTER__RELOAD_INTERVAL": "7"},
    )
    assert overridden.stdout.strip() == "7", overridden.stderr


def test_airflow_hybrid_router_validate(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nexecutors: {local: {class: LocalExecutor}}\nrules:\n  - run_on: nowhere\n")
    env = airflow_env(tmp_path)
    good = airflow("hybrid-router", "validate", str(DEFAULT_POLICY), env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"{DEFAULT_POLICY}: valid" in good.stdout

    bad = airflow("hybrid-router", "validate", str(broken), env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"{broken}:4:" in bad.stdout


def test_explain_and_simulate_use_the_run_history(metadata_db, runs):
    for _ in range(3):
        runs.add("reports", "build", 40 * 60)  # too long for Lambda's 15 minutes
        runs.add("reports", "quick", 20)
    runs.add("reports", "once", 3 * 3600)  # a single run: below history_min_runs
    env = metadata_db.env(AIRFLOW__HYBRID_ROUTER__POLICY_FILE=str(EXAMPLE_POLICY))

    explained = run_module("explain", "--dag-id", "reports", "--task-id", "build", "--json", env=env)
    assert explained.returncode == 0, explained.stderr
    decision = json.loads(explained.stdout)
    assert decision["policy"] == str(EXAMPLE_POLICY)  # --policy defaults to [hybrid_router] policy_file
    assert decision["duration_source"] == "history"
    assert abs(decision["expected_duration_s"] - 2400) < 1
    assert decision["executor"] == "local"

    once = run_module("explain", "--dag-id", "reports", "--task-id", "once", "--json", env=env)
    decision = json.loads(once.stdout)
    assert decision["duration_source"] == "policy_default"
    assert any("fewer than [hybrid_router] history_min_runs = 3" in reason for reason in decision["reasons"])

    simulated = run_module("simulate", "--from-db", "--days", "2", "--json", env=env)
    assert simulated.returncode == 0, simulated.stderr
    report = json.loads(simulated.stdout)
    assert report["tasks"] == 7
    # build: 40m from its history, too long for lambda; once: too few runs, so the policy's 2m default
    assert report["executors"]["local"]["tasks"] == 3
    assert report["executors"]["lambda"]["tasks"] == 4
    # task-hours are the measured worker time, whatever the estimate
    assert (
        abs(
            sum(load["task_hours"] for load in report["executors"].values())
            - (3 * 40 / 60 + 3 * 20 / 3600 + 3)
        )
        < 0.01
    )


def test_explain_says_when_the_database_is_unreachable(tmp_path):
    env = airflow_env(
        tmp_path,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'airflow.db'}",
    )
    result = run_module(
        "explain", "--policy", str(EXAMPLE_POLICY), "--dag-id", "d", "--task-id", "t", "--json", env=env
    )
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["duration_source"] == "policy_default"
    assert "metadata database not reachable" in decision["reasons"][0]


def test_simulate_from_an_unreachable_database_exits_1(tmp_path):
    env = airflow_env(
        tmp_path,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'airflow.db'}",
    )
    result = run_module("simulate", "--policy", str(EXAMPLE_POLICY), "--from-db", env=env)
    assert result.returncode == 1
    assert "cannot read the metadata database" in result.stderr

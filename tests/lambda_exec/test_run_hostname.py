"""The hostname a Lambda run gives Airflow names the run, in a forked child and in a new process alike, so
that the execution API never takes one copy of an event for another (``lambda_exec/run_hostname.py``; the
end-to-end proof against a real API server is ``test_e2e_same_host_pid.py``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hybrid_router.lambda_exec import run_hostname
from hybrid_router.lambda_exec.handler import handle
from hybrid_router.lambda_exec.run_hostname import (
    BASE_CALLABLE_ENV,
    CALLABLE,
    HOSTNAME_CALLABLE_ENV,
    MAX_LENGTH,
    RUN_ID_ENV,
)
from hybrid_router.lambda_exec.task_runner import TaskRunnerLoader

from .handler_support import FakeContext, fake_claim, make_event, make_sandbox, sealed, until_finished

if TYPE_CHECKING:
    from moto_sqs import Moto

# What the workload's process reports: the hostname Airflow's API client sends with /run and every heartbeat.
REPORT_HOSTNAME = """
import json, os, sys
from airflow.sdk.api.client import get_hostname
spec = json.load(open(sys.argv[1]))
with open(os.environ["HYBRID_ROUTER_CLAIM_FILE"], "w") as claim:
    claim.write("claimed")
with open(spec["record"], "w") as out:
    json.dump({"hostname": get_hostname(), "run_id": os.environ["HYBRID_ROUTER_RUN_ID"]}, out)
"""


class HostnameRunner:
    """Airflow's task runner in the handler's forked child, reduced to asking Airflow for its hostname."""

    def run(self, workload_json: str) -> int:
        from airflow.sdk.api.client import get_hostname

        spec = json.loads(workload_json)
        fake_claim(spec)
        with open(spec["record"], "w") as out:
            json.dump({"hostname": get_hostname(), "run_id": os.environ[RUN_ID_ENV]}, out)
        return 0


def report_hostname_command(path: str) -> list[str]:
    return [sys.executable, "-c", REPORT_HOSTNAME, path]


def run_and_report(sandbox: Any, results_queue: str, moto: Moto, record: Path) -> dict[str, str]:
    answer = handle(sealed(make_event(results_queue, {"record": str(record)})), FakeContext(120), sandbox)
    assert answer["status"] == "success", answer
    finished = until_finished(moto, results_queue)[-1]
    seen = json.loads(record.read_text())
    assert seen["run_id"] == finished.run_id != ""
    return seen


@pytest.mark.parametrize("mode", ["fork", "new process"])
def test_each_run_gives_airflow_a_hostname_of_its_own(
    results_queue: str, moto_server: Moto, tmp_path: Path, mode: str
) -> None:
    from airflow.utils.net import getfqdn

    if mode == "fork":
        sandbox = make_sandbox(task_runner=TaskRunnerLoader(factory=HostnameRunner))
    else:
        sandbox = make_sandbox(workload_command=report_hostname_command)
    sandbox_callable = os.environ.get(HOSTNAME_CALLABLE_ENV)
    # Two copies of one event in one sandbox: the same machine, user and process tree.
    first = run_and_report(sandbox, results_queue, moto_server, tmp_path / "first.json")
    second = run_and_report(sandbox, results_queue, moto_server, tmp_path / "second.json")

    for seen in (first, second):
        # The sandbox's name as Airflow's default gives it, then the run: where it ran, and which run it was.
        assert seen["hostname"] == f"{getfqdn()}-run-{seen['run_id']}"
    assert first["hostname"] != second["hostname"]
    # The sandbox itself keeps its own settings.
    assert os.environ.get(HOSTNAME_CALLABLE_ENV) == sandbox_callable and RUN_ID_ENV not in os.environ


def test_the_functions_own_hostname_callable_still_names_the_sandbox(
    results_queue: str, moto_server: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A function that sets its own callable (here one whose answer cannot be mistaken for Airflow's default).
    monkeypatch.setenv(HOSTNAME_CALLABLE_ENV, "getpass.getuser")
    sandbox = make_sandbox(workload_command=report_hostname_command)

    seen = run_and_report(sandbox, results_queue, moto_server, tmp_path / "record.json")

    import getpass

    assert seen["hostname"] == f"{getpass.getuser()}-run-{seen['run_id']}"
    assert os.environ[HOSTNAME_CALLABLE_ENV] == "getpass.getuser"


def test_the_run_environment_keeps_the_functions_callable_apart() -> None:
    assert run_hostname.run_environment({}) == {HOSTNAME_CALLABLE_ENV: CALLABLE}
    assert run_hostname.run_environment({HOSTNAME_CALLABLE_ENV: "my.module.name"}) == {
        HOSTNAME_CALLABLE_ENV: CALLABLE,
        BASE_CALLABLE_ENV: "my.module.name",
    }
    # A sandbox whose environment already names ours (a run's process starting a workload of its own).
    assert run_hostname.run_environment({HOSTNAME_CALLABLE_ENV: CALLABLE}) == {
        HOSTNAME_CALLABLE_ENV: CALLABLE
    }


def test_the_run_hostname_fits_airflows_column_and_keeps_the_run_whole() -> None:
    run_id = "0123456789abcdef0123456789abcdef"
    assert run_hostname.run_hostname("169.254.12.34", run_id) == f"169.254.12.34-run-{run_id}"
    long = run_hostname.run_hostname("h" * 2000, run_id)
    assert len(long) == MAX_LENGTH and long.endswith(f"h-run-{run_id}")
    # No run (a workload started outside the handler): the sandbox's name alone, as Airflow would give it.
    assert run_hostname.run_hostname("169.254.12.34", "") == "169.254.12.34"

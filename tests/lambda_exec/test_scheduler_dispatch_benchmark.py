"""The dispatch benchmark through a real scheduler (benchmarks/scheduler_dispatch.py): how it reads its figures,
and the whole benchmark as a (slow) test."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from datetime import datetime, timezone

import pytest
from benchmark_scripts import BENCHMARKS
from benchmark_scripts import load_benchmark as load_benchmark_script

BENCHMARK = BENCHMARKS / "scheduler_dispatch.py"


def load_benchmark():
    return load_benchmark_script("scheduler_dispatch")


SCHEDULER_LOG = """\
2026-11-26T15:25:28.500000Z [info     ] 2 tasks up for execution:
\t<TaskInstance: d.work manual__x map_index=0 [scheduled]>
2026-11-26T15:25:28.626794Z [info     ] Setting the following tasks to queued state (scheduler job_id=1):
\t<TaskInstance: d.work manual__x map_index=0 [scheduled] ti_id=01a21876-2dac-7e5d-b2a1-e9999bc4ef58> \
(id=01a21876-2dac-7e5d-b2a1-e9999bc4ef58, try_number=1)
\t<TaskInstance: d.work manual__x map_index=1 [scheduled] ti_id=01a21876-2dae-7610-b61e-fda1d86c5bcb> \
(id=01a21876-2dae-7610-b61e-fda1d86c5bcb, try_number=1) [airflow.jobs.scheduler_job_runner] loc=x.py:1014
2026-11-26T15:25:29.000000Z [info     ] Trying to enqueue tasks: [<TaskInstance: d.work (id=ffff, try_number=1)>]
2026-11-26T15:25:33.560977Z [info     ] Setting the following tasks to queued state (scheduler job_id=1):
\t<TaskInstance: d.work manual__x map_index=0 [scheduled] ti_id=01a21876-2dac-7e5d-b2a1-e9999bc4ef58> \
(id=01a21876-2dac-7e5d-b2a1-e9999bc4ef58, try_number=1)
\t<TaskInstance: d.work manual__x map_index=0 [scheduled] ti_id=01a21876-2dac-7e5d-b2a1-e9999bc4ef58> \
(id=01a21876-2dac-7e5d-b2a1-e9999bc4ef58, try_number=2)
"""


def test_the_first_queueing_of_each_try_comes_from_the_scheduler_log_lines_that_queue_it():
    queued = load_benchmark().first_queued(SCHEDULER_LOG)
    first = datetime(2026, 11, 26, 15, 25, 28, 626794, tzinfo=timezone.utc).timestamp()
    second = datetime(2026, 11, 26, 15, 25, 33, 560977, tzinfo=timezone.utc).timestamp()
    assert queued == {
        ("01a218762dac7e5db2a1e9999bc4ef58", 1): pytest.approx(first),  # not its later re-queueing
        ("01a218762dae7610b61efda1d86c5bcb", 1): pytest.approx(first),
        ("01a218762dac7e5db2a1e9999bc4ef58", 2): pytest.approx(second),  # another try: its own first queueing
    }


def test_nearest_rank_percentiles_and_the_alternating_plan():
    module = load_benchmark()
    values = [float(v) for v in range(1, 201)]
    assert (module.percentile(values, 50), module.percentile(values, 99)) == (100.0, 198.0)
    assert module.percentile([3.0], 99) == 3.0
    assert module.plan(["provider", "ours", "router", "local"], ["full", "api_only"]) == [
        ("provider", "full"),
        ("ours", "full"),
        ("router", "full"),
        ("local", None),
        ("provider", "api_only"),
        ("ours", "api_only"),
        ("router", "api_only"),
    ]


@pytest.mark.slow
def test_scheduler_dispatch_benchmark():
    out = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tasks", "200", "--rounds", "3"],
        capture_output=True,
        text=True,
        timeout=4 * 3600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [line["variant"] for line in lines] == ["full_handler", "api_only_handler"]
    executors_measured = lines[-1]
    for figures in lines:
        for e in ("provider", "ours", "router", "local"):
            assert figures[f"wall_s_{e}"] > 0
            assert 0 <= figures[f"queued_to_running_p50_s_{e}"] <= figures[f"queued_to_running_p99_s_{e}"]
            assert figures[f"scheduler_cpu_s_{e}"] > 0
        assert figures["speedup_vs_provider"] == pytest.approx(
            figures["wall_s_provider"] / figures["wall_s_ours"], abs=0.01
        )
        assert figures["latency_model"]["sqs_median_ms"] == 8
        # Our executor's own AWS calls per task (invoke, receives, batch deletes): fewer than the provider's.
        assert figures["aws_calls_per_task"] < figures["aws_calls_per_task_provider"]
    # The API-only handler spends next to no CPU in the sandboxes: the executors are what is measured.
    assert executors_measured["sandboxes_cpu_s_ours"] < lines[0]["sandboxes_cpu_s_ours"]


class _ExecutionApi(http.server.BaseHTTPRequestHandler):
    """The two execution-API calls of the API-only handler: /run hands over a new token, /state wants it."""

    calls: list[tuple[str, str, dict]] = []
    refuse_run = False

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append((self.path, self.headers["Authorization"], body))
        if self.path.endswith("/run"):
            self.send_response(409 if self.refuse_run else 200)
            self.send_header("Refreshed-API-Token", "execution-token")
        else:
            ok = self.headers["Authorization"] == "Bearer execution-token"
            self.send_response(204 if ok else 403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def execution_api(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ExecutionApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://127.0.0.1:{server.server_port}/execution/"
    )
    monkeypatch.setenv("DISPATCH_TASK_SECONDS", "0")
    _ExecutionApi.calls, _ExecutionApi.refuse_run = [], False
    yield _ExecutionApi
    server.shutdown()


def _handlers():
    return load_benchmark_script("dispatch_handlers")


def test_the_api_only_handler_claims_with_the_workloads_token_then_succeeds_with_the_one_it_got(
    execution_api,
):
    workload = json.dumps({"token": "workload-token", "ti": {"id": "ti-1"}})
    claims: list[bool] = []
    assert _handlers().claim_and_succeed(workload, claims.append) is True
    (run_path, run_auth, run_body), (state_path, state_auth, state_body) = execution_api.calls
    assert (run_path, run_auth, run_body["state"]) == (
        "/execution/task-instances/ti-1/run",
        "Bearer workload-token",
        "running",
    )
    assert (state_path, state_auth, state_body["state"]) == (
        "/execution/task-instances/ti-1/state",
        "Bearer execution-token",
        "success",
    )
    assert claims == [True]


def test_the_api_only_handler_reports_a_refused_claim_and_goes_no_further(execution_api):
    execution_api.refuse_run = True
    claims: list[bool] = []
    workload = json.dumps({"token": "workload-token", "ti": {"id": "ti-1"}})
    assert _handlers().claim_and_succeed(workload, claims.append) is False
    assert [path for path, _, _ in execution_api.calls] == ["/execution/task-instances/ti-1/run"]
    assert claims == [False]

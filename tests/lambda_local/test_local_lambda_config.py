"""The service's YAML file and command line: bad input names the file, the line and the field."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_router.lambda_exec.local.config import ConfigError, FunctionConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "functions.yaml"
    path.write_text(text)
    return path


def test_a_full_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
log_dir: logs
account_concurrency: 8
retry_delays_s: [0.5, 1]
throttle_retry_s: [0.5, 60]
functions:
  - name: airflow-task
    memory_mb: 2048
    timeout_s: 120
    reserved_concurrency: 4
    environment: {HYBRID_ROUTER_DEADLINE_MARGIN_S: 5}
    dead_letter_queue_url: http://127.0.0.1:1/123456789012/dlq
    maximum_retry_attempts: 1
    maximum_event_age_s: 60
""",
    )
    config = load_config(path)
    (fn,) = config.functions
    assert fn.name == "airflow-task" and fn.handler == "hybrid_router.lambda_exec.handler.handler"
    assert (fn.memory_mb, fn.timeout_s, fn.reserved_concurrency) == (2048, 120, 4)
    assert fn.environment == {"HYBRID_ROUTER_DEADLINE_MARGIN_S": "5"}  # Lambda's variables are strings
    assert config.retry_delays_s == (0.5, 1)
    assert config.throttle_retry_s == (0.5, 60)
    assert config.account_concurrency == 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "functions:\n  - name: f\n    memory_mb: 64\n",
            r"functions\.yaml:3: functions\[0\]\.memory_mb: expected an integer",
        ),
        ("functions:\n  - name: f\n\n    timeout_s: 901\n", r":4: functions\[0\]\.timeout_s"),
        ("functions:\n  - name: f\n    handler: not-a-path\n", r":3: functions\[0\]\.handler"),
        (
            "functions:\n  - name: f\n    maximum_retry_attempts: 3\n",
            r":3: functions\[0\]\.maximum_retry_attempts",
        ),
        ("functions:\n  - name: f\n    colour: blue\n", r":3: functions\[0\]\.colour: unknown field"),
        ("functions:\n  - memory_mb: 512\n", r":2: functions\[0\]\.name: required"),
        ("functions:\n  - name: f\n  - name: f\n", r"duplicate function names \['f'\]"),
        ("account_concurrency: 0\n", r":1: account_concurrency: expected a positive integer"),
        ("retry_delays_s: [1]\n", r":1: retry_delays_s"),
        ("\nthrottle_retry_s: [5, 1]\n", r":2: throttle_retry_s: expected \[first, most\] seconds"),
        ("throttle_retry_s: [1]\n", r":1: throttle_retry_s"),
        ("colour: blue\n", r":1: unknown setting 'colour'"),
        ("functions: [\n", r"functions\.yaml:2: not valid YAML"),
        ("functions: {name: f}\n", r":1: functions: expected a list"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_function_config_checks_its_arguments() -> None:
    with pytest.raises(ConfigError, match="memory_mb"):
        FunctionConfig("f", memory_mb=100)
    with pytest.raises(ConfigError, match="name"):
        FunctionConfig("has space")
    assert FunctionConfig("f").maximum_retry_attempts == 0, "Lambda's own retries are off by default"


def test_cli_rejects_a_bad_file_with_exit_code_2(tmp_path: Path) -> None:
    path = write(tmp_path, "functions:\n  - name: f\n    memory_mb: 64\n")
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_router.lambda_exec.local", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{path}:3: functions[0].memory_mb" in result.stderr


def test_cli_prints_its_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    path = write(tmp_path, f"log_dir: {tmp_path / 'logs'}\nfunctions:\n  - name: f\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybrid_router.lambda_exec.local", "--port", "0", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("LOCAL_LAMBDA_URL=http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

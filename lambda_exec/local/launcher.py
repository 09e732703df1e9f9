"""Start the local Lambda service as a subprocess, for tests, the demo and benchmarks.

::

    with LocalLambdaService(functions=[FunctionConfig("airflow-task", environment={...})],
                            env=os.environ | extra, sqs_endpoint_url=moto_url) as svc:
        client = boto3.client("lambda", endpoint_url=svc.url, region_name="us-east-1", ...)
        svc.set_delivery_faults(duplicate_next=1)
        svc.stats()

The service runs in its own process group; ``stop()`` sends SIGTERM (the service kills its sandboxes' trees),
then SIGKILL to the group if it does not stop in time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from hybrid_router.lambda_exec.local.__main__ import URL_LINE_PREFIX
from hybrid_router.lambda_exec.local.config import (
    DEFAULT_ACCOUNT_CONCURRENCY,
    DEFAULT_RETRY_DELAYS_S,
    DEFAULT_THROTTLE_RETRY_S,
    FunctionConfig,
    ServiceConfig,
)
from hybrid_router.lambda_exec.local.faults import FaultSettings
from hybrid_router.lambda_exec.local.sandbox import log_stream_path

__all__ = ["FunctionConfig", "LocalLambdaError", "LocalLambdaService", "log_stream_path"]


class LocalLambdaError(RuntimeError):
    """The service did not start or did not answer; the message ends with the tail of its log."""


class LocalLambdaService:
    def __init__(
        self,
        functions: Sequence[FunctionConfig] = (),
        env: Mapping[str, str] | None = None,
        sqs_endpoint_url: str | None = None,
        log_dir: str | Path | None = None,
        port: int = 0,
        account_concurrency: int = DEFAULT_ACCOUNT_CONCURRENCY,
        retry_delays_s: Sequence[float] = DEFAULT_RETRY_DELAYS_S,
        throttle_retry_s: Sequence[float] = DEFAULT_THROTTLE_RETRY_S,
        idle_sandbox_ttl_s: float = 300.0,
        faults: FaultSettings | None = None,
        startup_timeout_s: float = 30.0,
        log_level: str = "INFO",
    ):
        # Holds the generated config file, and the logs unless ``log_dir`` is given. Removed by stop() only when
        # it holds no logs: a run's Lambda logs are worth reading after it stopped.
        self._own_dir = tempfile.mkdtemp(prefix="local-lambda-")
        self._logs_in_own_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir is not None else Path(self._own_dir) / "logs"
        self.config = ServiceConfig(
            functions=tuple(functions),
            log_dir=str(self.log_dir),
            sqs_endpoint_url=sqs_endpoint_url,
            account_concurrency=account_concurrency,
            retry_delays_s=tuple(float(d) for d in retry_delays_s),
            throttle_retry_s=tuple(float(d) for d in throttle_retry_s),  # type: ignore[arg-type]
            idle_sandbox_ttl_s=idle_sandbox_ttl_s,
            faults=faults or FaultSettings(),
        )
        self.env = dict(os.environ if env is None else env)
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.log_level = log_level
        self.config_path = Path(self._own_dir) / "functions.yaml"
        self.service_log = self.log_dir / "service.log"
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------------------

    def start(self) -> LocalLambdaService:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.parent.mkdir(parents=True, exist_ok=True)  # stop() may have removed it
        self.config_path.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False), encoding="utf-8")
        with open(self.service_log, "ab") as log_file:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hybrid_router.lambda_exec.local",
                    "--port",
                    str(self.port),
                    "--config",
                    str(self.config_path),
                    "--log-level",
                    self.log_level,
                    "--parent-pid",
                    str(os.getpid()),
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,
            )
        url_ready = threading.Event()
        assert self._proc.stdout is not None
        self._reader = threading.Thread(
            target=self._read_stdout,
            args=(self._proc.stdout, url_ready),
            name="local-lambda-stdout",
            daemon=True,
        )
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not url_ready.wait(0.05):
            if self._proc.poll() is not None:
                raise LocalLambdaError(
                    f"the local Lambda service exited with code {self._proc.returncode}{self._tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise LocalLambdaError(
                    f"the local Lambda service did not start in {self.startup_timeout_s:.0f}s{self._tail()}"
                )
        return self

    def _read_stdout(self, stream: IO[bytes], url_ready: threading.Event) -> None:
        # Keep draining stdout after the URL line so the service can never block on a full pipe.
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").strip()
            if line.startswith(URL_LINE_PREFIX) and not url_ready.is_set():
                self.url = line[len(URL_LINE_PREFIX) :]
                url_ready.set()
        stream.close()

    def stop(self, grace_s: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the service's own group
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._proc = None
        if not self._logs_in_own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> LocalLambdaService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- local-only endpoints -----------------------------------------------------------------------------

    def set_delivery_faults(
        self, duplicate_next: int = 0, settings: FaultSettings | None = None
    ) -> dict[str, Any]:
        """Deliver each of the next ``duplicate_next`` async events twice (same request id); ``settings``
        replaces the service's latency and fault settings (see faults.py). Returns the injected counts."""
        body: dict[str, Any] = {"duplicate_next": duplicate_next}
        if settings is not None:
            body.update(settings.to_dict())
        return self._call("POST", "/_local/faults", body)

    def stats(self) -> dict[str, Any]:
        """Counters per function (invocations, cold_starts, warm_starts, throttles, retries, dlq_sends, ...)."""
        return self._call("GET", "/_local/stats")

    def log_stream_path(self, function_name: str, stream_name: str) -> Path:
        return log_stream_path(self.log_dir, function_name, stream_name)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if not self.url:
            raise LocalLambdaError("the local Lambda service is not running")
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def _tail(self, lines: int = 30) -> str:
        try:
            text = self.service_log.read_text(errors="replace")
        except OSError:
            return ""
        return f"; last lines of {self.service_log}:\n" + "\n".join(text.splitlines()[-lines:])

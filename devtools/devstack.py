"""Start the servers the demo, the end-to-end tests and the benchmarks need, on 127.0.0.1 only.

- ``MotoServer``: moto's server (SQS, ECS...) in a subprocess.
- ``AirflowStack``: a real Airflow 3 (API server, scheduler, DAG processor) on SQLite, configured through
  ``AIRFLOW__*`` variables so that every process it starts, and any process given ``stack.env`` (such as the local
  Lambda service that runs tasks), sees the same settings.

Every process runs in its own process group and is stopped (the whole group) by ``stop()``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class StackError(RuntimeError):
    """A server did not start, or an API call failed; the message points at the component's log file."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _http_ok(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError):
        return False


class ManagedProcess:
    """A subprocess in its own process group, with its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], log_file: Path, cwd: Path | None = None
    ):
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_file = log_file
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_file, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise StackError(
                f"{self.name} exited with code {self.proc.returncode}; see {self.log_file}:\n{self.tail()}"
            )

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL, group: bool = True) -> None:
        """Send ``sig`` to the process (and its group); used to simulate a crash."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with suppress(ProcessLookupError):
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                os.kill(self.proc.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> None:
        self.terminate()
        self.wait_and_sweep(time.monotonic() + grace)

    def terminate(self) -> None:
        """Ask the whole group to stop (SIGTERM), without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def wait_and_sweep(self, deadline: float) -> None:
        """Wait for the leader until ``deadline``, then kill whatever is left of its group."""
        if self.proc is None:
            return
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # The leader may be gone while workers of its group live on: always sweep the group.
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None


class MotoServer:
    """moto's server on a free loopback port (SQS, ECS and the rest of moto's services)."""

    def __init__(self, log_dir: Path | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
        self._process = ManagedProcess(
            "moto_server",
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
            env={**os.environ, **FAKE_AWS_ENV},
            log_file=log_dir / f"moto-{self.port}.log",
        )

    def start(self) -> MotoServer:
        self._process.start()
        wait_until(lambda: self._check() and _http_ok(f"{self.url}/moto-api/"), 30, "moto server")
        return self

    def _check(self) -> bool:
        self._process.check_alive()
        return True

    def stop(self) -> None:
        self._process.stop(grace=5)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (a benchmark reads its CPU time)."""
        proc = self._process.proc
        return proc.pid if proc is not None else None

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def create_queue(self, name: str, **attributes: str) -> str:
        return self.client("sqs").create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]


def _airflow_bin() -> str:
    candidate = Path(sys.executable).with_name("airflow")
    return str(candidate) if candidate.exists() else "airflow"


class AirflowStack:
    """A real Airflow 3: API server, DAG processor and one or more schedulers, all on loopback.

    The metadata database is a SQLite file in ``home`` unless ``database_url`` names another (PostgreSQL: see
    ``devtools.postgres``; SQLite allows one scheduler only). ``config`` maps section -> option -> value and becomes ``AIRFLOW__SECTION__OPTION`` variables, so the settings
    reach every Airflow process and every process started with ``stack.env``. ``scheduler_env`` is added to the
    schedulers' environment only (``stack.scheduler_env``), on top of ``stack.env`` as it is when a scheduler
    starts (a benchmark that changes ``stack.env`` between scheduler restarts changes the schedulers' too).
    With ``api_server_only`` it starts the API server alone (its DAGs come from ``airflow dags reserialize``):
    enough for what reads the metadata database through the API, such as the Routing page's benchmark.
    """

    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        executor: str = "LocalExecutor",
        config: Mapping[str, Mapping[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        parallelism: int = 32,
        database_url: str | None = None,
        schedulers: int = 1,
        scheduler_env: Mapping[str, str] | None = None,
        api_server_only: bool = False,
    ):
        self.home = Path(home)
        self.api_server_only = api_server_only
        self.database_url = database_url or f"sqlite:///{self.home / 'airflow.db'}"
        if schedulers > 1 and self.database_url.startswith("sqlite"):
            raise StackError("several schedulers need a database that allows them (PostgreSQL), not SQLite")
        self.schedulers = schedulers
        self.dags_folder = Path(dags_folder)
        self.api_port = free_port()
        self.api_url = f"http://{LOOPBACK}:{self.api_port}"
        self.log_dir = self.home / "process-logs"
        self.task_log_dir = self.home / "logs"
        settings: dict[str, dict[str, Any]] = {
            "core": {
                "dags_folder": self.dags_folder,
                "executor": executor,
                "load_examples": False,
                "parallelism": parallelism,
                "dags_are_paused_at_creation": False,
                "simple_auth_manager_all_admins": True,
                "execution_api_server_url": f"{self.api_url}/execution/",
                "fernet_key": "",
            },
            "database": {"sql_alchemy_conn": self.database_url},
            "api": {
                "host": LOOPBACK,
                "port": self.api_port,
                "base_url": self.api_url,
                "workers": 1,
                "secret_key": secrets.token_hex(16),
            },
            "api_auth": {"jwt_secret": secrets.token_hex(32)},
            "logging": {
                "base_log_folder": self.task_log_dir,
                "worker_log_server_port": free_port(),
                "trigger_log_server_port": free_port(),
            },
            "scheduler": {
                "scheduler_heartbeat_sec": 1,
                "scheduler_idle_sleep_time": 0.2,
                "enable_health_check": False,
            },
            "dag_processor": {"refresh_interval": 2, "min_file_process_interval": 30},
        }
        for section, options in (config or {}).items():
            settings.setdefault(section, {}).update(options)
        self.settings = settings
        self.env: dict[str, str] = {
            key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW__")
        }
        self.env.update(FAKE_AWS_ENV)
        self.env["AIRFLOW_HOME"] = str(self.home)
        self.env["PYTHONUNBUFFERED"] = "1"
        for section, options in settings.items():
            for option, value in options.items():
                self.env[f"AIRFLOW__{section.upper()}__{option.upper()}"] = _conf_value(value)
        self.env.update(env or {})
        # Only the schedulers talk to SQS: faults meant for the executors' receives go there, not to every process.
        self.scheduler_env: dict[str, str] = dict(scheduler_env or {})
        self._processes: dict[str, ManagedProcess] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> AirflowStack:
        self.home.mkdir(parents=True, exist_ok=True)
        self.migrate()
        self._start("api-server", ["api-server", "--port", str(self.api_port), "--host", LOOPBACK])
        if not self.api_server_only:
            self._start("dag-processor", ["dag-processor"])
            self.start_scheduler()
        wait_until(
            lambda: self.check_alive() and _http_ok(f"{self.api_url}/api/v2/monitor/health"),
            90,
            "the API server",
        )
        if self.api_server_only:
            return self  # no task runs here: nothing calls the execution API
        # The execution API (Cadwyn) builds its versioned routes on its first request, in the API server's event
        # loop: 3.5 s on an idle 2-core machine, 9 s loaded, during which no request is served. A long-running
        # API server has paid that long ago; the first task of a test must not pay it inside its own timeouts.
        wait_until(
            lambda: self.check_alive() and _http_ok(f"{self.api_url}/execution/health", timeout=30),
            90,
            "the execution API",
        )
        return self

    def migrate(self) -> None:
        result = subprocess.run(
            [_airflow_bin(), "db", "migrate"], env=self.env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise StackError(f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``airflow <args>`` with the stack's settings (its database, its policy file), as its users run it."""
        return subprocess.run(
            [_airflow_bin(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_scheduler(self, name: str | None = None) -> None:
        """Start the scheduler(s): all ``schedulers`` of them, or the one called ``name`` (restarting it)."""
        for scheduler in [name] if name else self.scheduler_names:
            self._start(scheduler, ["scheduler"], {**self.env, **self.scheduler_env})

    @property
    def scheduler_names(self) -> list[str]:
        """``scheduler`` alone, or ``scheduler-1``, ``scheduler-2``, ... (also their log files' names)."""
        if self.schedulers == 1:
            return ["scheduler"]
        return [f"scheduler-{number}" for number in range(1, self.schedulers + 1)]

    def kill_scheduler(self, sig: int = signal.SIGKILL, group: bool = False, name: str = "scheduler") -> None:
        """Kill a scheduler as a crash would: by default only its main process, not its workers."""
        process = self._processes.pop(name, None)
        if process is not None:
            process.kill(sig, group=group)
            # Sweep what is left of the group later, at stop(), as a new supervisor would.
            self._processes[f"scheduler-dead-{time.monotonic_ns()}"] = process

    def stop(self, grace: float = 10.0) -> None:
        """Stop every component at once (each one's shutdown overlaps the others'), then sweep their groups."""
        processes = list(self._processes.values())
        self._processes.clear()
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + grace
        for process in processes:
            process.wait_and_sweep(deadline)

    def __enter__(self) -> AirflowStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> None:
        process = ManagedProcess(
            name, [_airflow_bin(), *args], env or self.env, self.log_dir / f"{name}.log", self.home
        )
        process.start()
        self._processes[name] = process

    def check_alive(self) -> bool:
        """Raise StackError, with the tail of its log, if a component has died."""
        for name in ("api-server", "dag-processor", *self.scheduler_names):
            process = self._processes.get(name)
            if process is not None:
                process.check_alive()
        return True

    def pid(self, name: str) -> int | None:
        """The process id of a running component (``api-server``, ``dag-processor``, a scheduler's name)."""
        process = self._processes.get(name)
        return process.proc.pid if process is not None and process.proc is not None else None

    def process_log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # -- REST API --------------------------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, *, accept: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.api_url}{path}", method=method, data=data)
        req.add_header("Accept", accept)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            raise StackError(f"{method} {path} -> {exc.code}: {exc.read()[:500]!r}") from None
        if accept != "application/json":
            return payload.decode(errors="replace")
        return json.loads(payload) if payload else None

    def wait_dag(self, dag_id: str, timeout: float = 90) -> dict[str, Any]:
        def parsed() -> dict[str, Any] | None:
            self.check_alive()
            try:
                return self.api("GET", f"/api/v2/dags/{dag_id}")
            except StackError:
                return None

        return wait_until(parsed, timeout, f"DAG {dag_id!r} to be parsed", interval=0.5)

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        self.wait_dag(dag_id)
        self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{_q(run_id)}")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 120) -> str:
        def finished() -> str | None:
            self.check_alive()
            state = self.dag_run(dag_id, run_id)["state"]
            return state if state in ("success", "failed") else None

        return wait_until(finished, timeout, f"run {run_id!r} of {dag_id!r} to finish", interval=0.5)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        result = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances?limit=1000")
        return result["task_instances"]

    def task_log(
        self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1
    ) -> str:
        path = (
            f"/api/v2/dags/{dag_id}/dagRuns/{_q(run_id)}/taskInstances/{task_id}/logs/{try_number}"
            f"?full_content=true&map_index={map_index}"
        )
        text = self.api("GET", path, accept="application/x-ndjson")
        lines = []
        for raw in text.splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                lines.append(raw)
                continue
            lines.append(_log_line(record))
        return "\n".join(lines)

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the metadata database directly, for assertions the REST API does not expose.

        ``query`` uses ``?`` placeholders whatever the database.
        """
        if self.database_url.startswith("sqlite"):
            import sqlite3

            with sqlite3.connect(self.database_url.removeprefix("sqlite:///"), timeout=30) as db:
                return db.execute(query, params).fetchall()
        import psycopg2

        from devtools.postgres import connect_args

        connection = psycopg2.connect(**connect_args(self.database_url))
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(query.replace("%", "%%").replace("?", "%s"), params)
                return cursor.fetchall()
        finally:
            connection.close()


def _log_line(record: Any) -> str:
    if not isinstance(record, dict):
        return str(record)
    event = record.get("event", "")
    extras = {k: v for k, v in record.items() if k not in ("event", "timestamp", "level", "logger")}
    parts = [str(record.get("timestamp", "")), str(record.get("level", "")), str(event)]
    if extras:
        parts.append(json.dumps(extras, default=str))
    return " ".join(part for part in parts if part)


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


@contextmanager
def running(*servers: Any) -> Iterator[None]:
    """Start servers in order and stop them in reverse order, whatever happens."""
    started: list[Any] = []
    try:
        for server in servers:
            server.start()
            started.append(server)
        yield
    finally:
        for server in reversed(started):
            with suppress(Exception):
                server.stop()

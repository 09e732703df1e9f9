"""A throw-away PostgreSQL cluster on loopback for the tests, the benchmarks and ``make demo DEMO_ARGS=--postgres``.

``initdb`` and ``pg_ctl`` refuse to run as root, and CI runs as root: as root the cluster belongs to the
``postgres`` user (``runuser -u postgres``) and lives in a folder that user owns; as anyone else it runs as the
current user. The server listens on 127.0.0.1 and a free port only, and ``stop()`` removes the folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from devtools.devstack import LOOPBACK, StackError, free_port

SERVICE_USER = "postgres"
DATABASE = "airflow"
ROLE = "airflow"
HOW_TO_INSTALL = (
    "PostgreSQL's server programs (initdb, pg_ctl, postgres) are needed on the PATH: on Debian or Ubuntu "
    "`apt-get install postgresql` (then add /usr/lib/postgresql/<version>/bin to the PATH), or set "
    "HYBRID_ROUTER_PG_BIN to the folder that holds them"
)


def connect_args(url: str) -> dict[str, Any]:
    """psycopg2's keyword arguments for a SQLAlchemy ``postgresql+psycopg2://`` URL."""
    parsed = make_url(url)
    return {"host": parsed.host, "port": parsed.port, "user": parsed.username, "dbname": parsed.database}


def set_database_options(url: str, **options: str | int) -> None:
    """``ALTER DATABASE ... SET`` each option, for every later session on the database of ``url``.

    ``idle_in_transaction_session_timeout``, for one: a scheduler killed in a transaction leaves it open while
    any process it forked (its LocalExecutor's workers) holds the connection, and its row locks with it.
    """
    import psycopg2
    from psycopg2 import sql

    args = connect_args(url)
    connection = psycopg2.connect(**args)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            for name, value in options.items():
                cursor.execute(
                    sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                        sql.Identifier(args["dbname"]), sql.Identifier(name), sql.Literal(str(value))
                    )
                )
    finally:
        connection.close()


class PostgresUnavailable(StackError):
    """No PostgreSQL server programs here, or no user that may run them."""


def _server_bin_dir() -> Path:
    configured = os.environ.get("HYBRID_ROUTER_PG_BIN")
    candidates = [Path(configured)] if configured else []
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if all((folder / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PostgresUnavailable(HOW_TO_INSTALL)


class PostgresServer:
    """``with PostgresServer() as pg: pg.url`` -> a SQLAlchemy URL of an empty ``airflow`` database."""

    def __init__(self, port: int | None = None) -> None:
        self.bin_dir = _server_bin_dir()
        self.port = port or free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root and shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root needs `runuser` to start PostgreSQL as its own user")
        self.folder: Path | None = None

    @property
    def url(self) -> str:
        return self.database_url(DATABASE)

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg2://{ROLE}@{LOOPBACK}:{self.port}/{name}"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", SERVICE_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StackError(
                f"{args[0]} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )

    def start(self) -> PostgresServer:
        self.folder = Path(tempfile.mkdtemp(prefix="hybrid-router-pg-"))
        data = self.folder / "data"
        if self._as_root:
            try:
                shutil.chown(self.folder, SERVICE_USER, SERVICE_USER)
            except LookupError as exc:
                raise PostgresUnavailable(f"running as root needs a {SERVICE_USER!r} user ({exc})") from exc
        self._run("initdb", "-D", str(data), "-U", ROLE, "--auth=trust", "--no-sync", "-E", "UTF8")
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses={LOOPBACK} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(self.folder / "server.log"), "-o", options, "-w", "start"
        )
        self.create_database(DATABASE)
        return self

    def create_database(self, name: str) -> str:
        """A new empty database on this server (``name``: letters, digits, underscores); its URL."""
        import psycopg2

        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        connection = psycopg2.connect(host=LOOPBACK, port=self.port, user=ROLE, dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
        finally:
            connection.close()
        return self.database_url(name)

    def stop(self) -> None:
        if self.folder is None:
            return
        data = self.folder / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
            except StackError:
                pass  # already gone: the folder goes all the same
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

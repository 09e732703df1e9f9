"""A killed scheduler's PostgreSQL session must end with it, whatever processes it forked live on.

The "scheduler" here is a real process on Airflow's own engine: it holds a pooled connection, forks a process
that lives on (a LocalExecutor worker), then locks a row in a transaction and is killed with SIGKILL, as the OOM
killer would. Seen from another connection, the row must be free again, as PostgreSQL frees it when the session's
socket closes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import psycopg2
import pytest

from devtools.devstack import wait_until
from devtools.postgres import connect_args

SCHEDULER = textwrap.dedent(
    """
    import os
    import sys
    import time

    from airflow import settings
    from sqlalchemy import text

    from hybrid_router.router.forked_connections import close_connections_shared_with_forks

    with settings.engine.connect() as connection:  # the pool holds it on: the scheduler's connection
        connection.execute(text("SELECT 1"))
    worker = os.fork()
    if worker == 0:  # a LocalExecutor worker: lives on after the scheduler
        time.sleep(300)
        os._exit(0)
    if sys.argv[1] == "close":
        close_connections_shared_with_forks()
    connection = settings.engine.connect()
    connection.execute(text("SELECT n FROM locked WHERE n = 1 FOR UPDATE"))
    print(worker, flush=True)
    time.sleep(300)
    """
)


def row_is_free(url: str) -> bool:
    with psycopg2.connect(**connect_args(url)) as db, db.cursor() as cursor:
        cursor.execute("SELECT n FROM locked WHERE n = 1 FOR UPDATE SKIP LOCKED")
        free = cursor.fetchall() == [(1,)]
        db.rollback()
        return free


@pytest.fixture
def locked_table(postgres_url: str) -> Iterator[str]:
    with psycopg2.connect(**connect_args(postgres_url)) as db, db.cursor() as cursor:
        cursor.execute("CREATE TABLE locked (n int PRIMARY KEY); INSERT INTO locked VALUES (1)")
    yield postgres_url


def start_scheduler(url: str, mode: str) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}
    process = subprocess.Popen(
        [sys.executable, "-c", SCHEDULER, mode],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise AssertionError(f"the scheduler script exited with {process.wait()} before locking the row")
    return process, int(line)


def kill_group(process: subprocess.Popen[str]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def test_the_killed_schedulers_locks_are_freed_while_the_process_it_forked_lives(locked_table):
    process, worker = start_scheduler(locked_table, "close")
    try:
        assert not row_is_free(locked_table)
        process.kill()  # the main process only: its worker lives on
        process.wait()
        os.kill(worker, 0)  # still alive
        wait_until(lambda: row_is_free(locked_table), 30, "the killed scheduler's row lock to be freed")
    finally:
        kill_group(process)


def test_without_closing_them_the_forked_process_keeps_the_killed_schedulers_session_and_its_locks(
    locked_table,
):
    # What the first test guards against, shown: the same scheduler without the call.
    process, worker = start_scheduler(locked_table, "keep")
    try:
        process.kill()
        process.wait()
        time.sleep(2)  # the first test's lock is free long before this
        assert not row_is_free(locked_table)
        os.kill(worker, signal.SIGKILL)  # the last copy of the socket goes: PostgreSQL ends the session
        wait_until(lambda: row_is_free(locked_table), 30, "the row lock to be freed with the worker")
    finally:
        kill_group(process)

"""How fast the Routing page's data endpoints answer with 100,000 routing records, on SQLite and on PostgreSQL.

For each database a real ``airflow api-server`` (the dev stack's, API server only, the simple auth manager with
a password login) serves 30 DAGs of 20 tasks (``airflow dags reserialize``) and a ``log`` table holding
``--records`` routing rows over the last week, written as the router writes them (``devtools/routing_records``):
routed, overflow, fallback, fallbacks exhausted, next-try fallback and route-error rows, and one
``run_finished`` row per run. On PostgreSQL ``ANALYZE log`` follows the load, as autovacuum would do within a
minute of it; SQLite has no statistics unless someone runs ``ANALYZE``, and Airflow never does.

A client logs in once (``POST /auth/token``) and calls each JSON endpoint with the bearer token, one request at
a time over one kept-alive connection, with what people ask: no filter, a DAG, a task, a DAG and task exactly, a
search that matches nothing, the next pages (``before_id``), the charts for 24 h and for 7 days, one task
instance's story. Each variant is asked once untimed first (imports, the policy read, the database's cache),
then ``--repeats`` times per round; rounds alternate which database goes first and reverse the order of the
variants. The time of a request is from sending it to the last byte of the answer, on this machine.

    python benchmarks/ui_api.py [--records 100000] [--rounds 5] [--repeats 3] [--databases sqlite,postgres]

It prints the machine, then p50/p95 per endpoint and database and per variant; the last line is one JSON object:
``p95_ms`` (the largest endpoint p95 over both databases, the target < 1000), ``records``, and per database
each endpoint's ``p50_ms``/``p95_ms``/``max_ms``/``requests``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import secrets
import sys
import tempfile
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# devtools/ lives in the checkout, not the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.devstack import LOOPBACK, AirflowStack, StackError
from devtools.machine import describe_machine, machine_line
from devtools.postgres import PostgresServer
from devtools.routing_records import dag_file, insert_rows, routing_rows
from hybrid_router.router import audit
from hybrid_router.router.history import percentile

TARGET_MS = 1000.0
USER = "admin"
ENDPOINTS = ("decisions", "fallbacks", "charts", "learned", "task", "live")


@dataclass(frozen=True)
class Variant:
    endpoint: str
    label: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def path(self) -> str:
        query = urllib.parse.urlencode(self.params)
        return f"/hybrid-router/api/{self.endpoint}" + (f"?{query}" if query else "")


class Client:
    """One user of the page: a token, and one kept-alive connection to the API server."""

    def __init__(self, stack: AirflowStack, password: str) -> None:
        self.stack = stack
        self.connection = http.client.HTTPConnection(LOOPBACK, stack.api_port, timeout=120)
        self.token: str | None = None
        status, answer = self.request("POST", "/auth/token", {"username": USER, "password": password})
        if status != 201:
            raise StackError(f"POST /auth/token -> {status}: {answer!r:.300}")
        self.token = answer["access_token"]

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self.connection.request(method, path, None if body is None else json.dumps(body), headers)
        response = self.connection.getresponse()
        payload = response.read()
        try:
            return response.status, json.loads(payload)
        except ValueError:
            return response.status, payload[:300]

    def timed(self, variant: Variant) -> float:
        started = time.perf_counter()
        status, answer = self.request("GET", variant.path)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if status != 200:
            raise StackError(f"GET {variant.path} -> {status}: {answer!r:.300}")
        return elapsed_ms

    def close(self) -> None:
        self.connection.close()


@contextmanager
def served(
    name: str, root: Path, dags: Path, rows: list[dict[str, Any]], database_url: str | None
) -> Iterator[tuple[AirflowStack, str]]:
    """An API server on its own database holding ``rows``; yields it and the admin's password."""
    home = root / name
    home.mkdir()
    password = secrets.token_urlsafe(16)
    password_file = home / "passwords.json"
    password_file.write_text(json.dumps({USER: password}))
    config = {
        "core": {
            "simple_auth_manager_all_admins": False,
            "simple_auth_manager_users": f"{USER}:admin",
            "simple_auth_manager_passwords_file": password_file,
        }
    }
    stack = AirflowStack(
        home / "airflow", dags, database_url=database_url, api_server_only=True, config=config
    )
    with stack:
        result = stack.cli("dags", "reserialize", timeout=600)
        if result.returncode != 0:
            raise StackError(
                f"airflow dags reserialize failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        started = time.monotonic()
        load(stack.database_url, rows)
        print(f"{name}: {len(rows):,} routing rows loaded in {time.monotonic() - started:.1f} s", flush=True)
        yield stack, password


def load(database_url: str, rows: list[dict[str, Any]]) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        insert_rows(engine, rows)
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                connection.execute(text("ANALYZE log"))
    finally:
        engine.dispose()


def variants(client: Client, rows: list[dict[str, Any]], rng: random.Random) -> list[Variant]:
    """What people ask the page for, with ids taken from the rows (the next pages from the answers)."""
    dag_id, task_id = "dag_07", "task_03"
    found: list[Variant] = []
    for endpoint in ("decisions", "fallbacks"):
        found += [
            Variant(endpoint, "no filter"),
            Variant(endpoint, "dag", (("dag_id", dag_id),)),
            Variant(endpoint, "task", (("task_id", task_id),)),
            Variant(endpoint, "dag+task exact", (("dag_id", dag_id), ("task_id", task_id), ("exact", 1))),
            Variant(endpoint, "search matching nothing", (("task_id", "no_such_task"),)),
        ]
        before_id = None
        for page in range(2, 11):
            _, answer = client.request(
                "GET", Variant(endpoint, "", (("before_id", before_id),) if before_id else ()).path
            )
            before_id = answer["next_before_id"]
            if before_id is None:
                break
            if page in (2, 10):
                found.append(Variant(endpoint, f"page {page}", (("before_id", before_id),)))
    found += [
        Variant("charts", "24 h", (("hours", 24),)),
        Variant("charts", "7 days", (("hours", 168),)),
        Variant("charts", "24 h, dag", (("hours", 24), ("dag_id", dag_id))),
        Variant("learned", "no filter"),
        Variant("learned", "dag", (("dag_id", dag_id),)),
        Variant("learned", "task", (("task_id", task_id),)),
    ]
    routed = [row for row in rows if row["event"] == audit.EVENT_ROUTED]
    for row in rng.sample(routed, min(3, len(routed))):
        params = (("dag_id", row["dag_id"]), ("task_id", row["task_id"]), ("run_id", row["run_id"]))
        found.append(Variant("task", f"story {len(found)}", params))
    status, answer = client.request("GET", Variant("live", "").path)
    if status == 200:
        found.append(Variant("live", "schedulers"))
    else:
        print(f"/live answers {status} ({answer!r:.200}): not measured", flush=True)
    return found


def summary(times: list[float]) -> dict[str, float | int]:
    ordered = sorted(times)
    return {
        "p50_ms": round(percentile(ordered, 0.5), 1),
        "p95_ms": round(percentile(ordered, 0.95), 1),
        "max_ms": round(ordered[-1], 1),
        "requests": len(ordered),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument(
        "--rounds", type=int, default=5, help="the order of databases alternates between them"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per variant and round")
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--dags", type=int, default=30)
    parser.add_argument("--tasks-per-dag", type=int, default=20)
    parser.add_argument("--days", type=float, default=7)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    databases = [name.strip() for name in args.databases.split(",") if name.strip()]
    if not set(databases) <= {"sqlite", "postgres"} or not databases:
        parser.error("--databases: sqlite, postgres or both")

    print(machine_line(), flush=True)
    dag_ids = [f"dag_{number:02d}" for number in range(args.dags)]
    started = time.monotonic()
    rows = routing_rows(
        args.records, dag_ids, tasks_per_dag=args.tasks_per_dag, days=args.days, seed=args.seed
    )
    kinds = Counter(row["event"].removeprefix("hybrid_router.") for row in rows)
    print(
        f"{len(rows):,} routing rows over {args.days:g} days, {args.dags} DAGs x {args.tasks_per_dag} tasks, "
        f"built in {time.monotonic() - started:.1f} s: {dict(kinds.most_common())}",
        flush=True,
    )
    times: dict[tuple[str, Variant], list[float]] = defaultdict(list)
    first_ms: dict[tuple[str, Variant], float] = {}
    with tempfile.TemporaryDirectory(prefix="ui-api-") as tmp, ExitStack() as servers:
        root = Path(tmp)
        dags = root / "dags"
        dags.mkdir()
        (dags / "routing_dags.py").write_text(dag_file(dag_ids, args.tasks_per_dag))
        clients: dict[str, Client] = {}
        asked: dict[str, list[Variant]] = {}
        for name in databases:
            url = None
            if name == "postgres":
                url = servers.enter_context(PostgresServer()).url
            stack, password = servers.enter_context(served(name, root, dags, rows, url))
            clients[name] = client = Client(stack, password)
            servers.callback(client.close)
            asked[name] = variants(client, rows, random.Random(args.seed))
            for variant in asked[name]:
                first_ms[name, variant] = client.timed(variant)
        for round_number in range(args.rounds):
            order = databases if round_number % 2 == 0 else list(reversed(databases))
            for name in order:
                ordered = asked[name] if round_number % 2 == 0 else list(reversed(asked[name]))
                for variant in ordered:
                    for _ in range(args.repeats):
                        times[name, variant].append(clients[name].timed(variant))
            print(f"round {round_number + 1}/{args.rounds} done", flush=True)

    figures: dict[str, dict[str, dict[str, float | int]]] = {}
    print(f"\n{'database':9s} {'endpoint':10s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s} {'n':>5s}")
    for name in databases:
        by_endpoint: dict[str, list[float]] = defaultdict(list)
        for (database, variant), values in times.items():
            if database == name:
                by_endpoint[variant.endpoint].extend(values)
        figures[name] = {
            endpoint: summary(by_endpoint[endpoint]) for endpoint in ENDPOINTS if by_endpoint[endpoint]
        }
        for endpoint, figure in figures[name].items():
            print(
                f"{name:9s} {endpoint:10s} {figure['p50_ms']:8.1f} {figure['p95_ms']:8.1f} "
                f"{figure['max_ms']:8.1f} {figure['requests']:5d}"
            )
    print(
        f"\n{'database':9s} {'endpoint':10s} {'variant':26s} {'p50 ms':>8s} {'p95 ms':>8s} {'first ms':>9s}"
    )
    for (name, variant), values in times.items():
        figure = summary(values)
        print(
            f"{name:9s} {variant.endpoint:10s} {variant.label:26s} {figure['p50_ms']:8.1f} "
            f"{figure['p95_ms']:8.1f} {first_ms[name, variant]:9.1f}"
        )
    worst = max(
        (
            (name, endpoint, figure["p95_ms"])
            for name in figures
            for endpoint, figure in figures[name].items()
        ),
        key=lambda item: item[2],
    )
    print(
        f"\nslowest endpoint at p95: {worst[1]} on {worst[0]}, {worst[2]:.1f} ms (target < {TARGET_MS:.0f} ms)"
    )
    print(
        json.dumps(
            {
                "p95_ms": worst[2],
                "records": len(rows),
                "target_ms": TARGET_MS,
                "slowest": f"{worst[0]} {worst[1]}",
                **figures,
                "rounds": args.rounds,
                "repeats": args.repeats,
                "dags": args.dags,
                "tasks_per_dag": args.tasks_per_dag,
                "days": args.days,
                "events": dict(kinds),
                "machine": describe_machine(),
                "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

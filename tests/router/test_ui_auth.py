"""Who sees what on the Routing page: its JSON endpoints under a real ``airflow api-server``, with Airflow's
default (simple) auth manager and with the FAB provider's, whose roles may read some DAGs and not others.

Routing rows for two DAGs, ``a`` and ``b``, are written as the router writes them (``devtools/routing_records``).
With FAB, DAG ``a`` gives the role ``dag_a_reader`` read access through its ``access_control``, as an operator
would: ``airflow dags reserialize`` turns that into the role's ``can_read`` on ``DAG:a``. Users log in through
``POST /auth/token`` and call the endpoints with the bearer token the UI itself uses.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from devtools.devstack import AirflowStack, StackError
from devtools.routing_records import dag_file, insert_rows, routing_rows
from hybrid_router.router import audit

pytestmark = pytest.mark.e2e

FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
READER_ROLE = "dag_a_reader"
# Every endpoint that returns DAG-scoped rows, with the list each answer keeps them in.
LISTS = {"decisions": "decisions", "fallbacks": "fallbacks", "learned": "tasks"}
NOW = datetime.now(timezone.utc)


class Page:
    """The Routing page's JSON endpoints on one API server, seeded with routing rows for DAGs ``a`` and ``b``."""

    def __init__(self, stack: AirflowStack, rows: list[dict[str, Any]], passwords: dict[str, str]) -> None:
        self.stack = stack
        self.rows = rows
        self.passwords = passwords
        self._tokens: dict[str, str] = {}

    def token(self, user: str) -> str:
        if user not in self._tokens:
            body = {"username": user, "password": self.passwords[user]}
            status, answer = self._call("POST", "/auth/token", body=body)
            assert status == 201, (status, answer)
            self._tokens[user] = answer["access_token"]
        return self._tokens[user]

    def get(self, endpoint: str, user: str | None, **params: Any) -> tuple[int, Any]:
        token = self.token(user) if user else None
        query = urllib.parse.urlencode(params)
        return self._call(
            "GET", f"/hybrid-router/api/{endpoint}" + (f"?{query}" if query else ""), token=token
        )

    def _call(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.stack.api_url}{path}", method=method, data=data)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, error.read()[:500]

    def story_of(self, dag_id: str) -> dict[str, Any]:
        """The parameters of ``/task`` for a task instance of ``dag_id``."""
        row = next(row for row in self.rows if row["dag_id"] == dag_id and row["event"] == audit.EVENT_ROUTED)
        return {"dag_id": dag_id, "task_id": row["task_id"], "run_id": row["run_id"], "map_index": -1}

    def routed_in_last_day(self, dag_ids: set[str]) -> int:
        since = NOW - timedelta(hours=24)
        return sum(
            1
            for row in self.rows
            if row["event"] == audit.EVENT_ROUTED and row["dag_id"] in dag_ids and row["dttm"] >= since
        )


def _seed(stack: AirflowStack) -> list[dict[str, Any]]:
    # Half a day of rows: every one of them inside the charts' 24 h window.
    rows = routing_rows(400, ["a", "b"], tasks_per_dag=3, days=0.5, now=NOW, seed=12)
    engine = create_engine(stack.database_url)
    try:
        insert_rows(engine, rows)
    finally:
        engine.dispose()
    return rows


def _dags_folder(tmp: Path, access_control: dict[str, Any] | None = None) -> Path:
    dags = tmp / "dags"
    dags.mkdir()
    (dags / "routing_dags.py").write_text(dag_file(["a", "b"], 3, access_control))
    return dags


def _cli(stack: AirflowStack, *args: str) -> None:
    result = stack.cli(*args)
    if result.returncode != 0:
        raise StackError(
            f"airflow {args[0]} {args[1]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )


@pytest.fixture(scope="module")
def fab_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    tmp = tmp_path_factory.mktemp("fab")
    dags = _dags_folder(tmp, {"a": {READER_ROLE: {"can_read"}}})
    stack = AirflowStack(tmp / "airflow", dags, api_server_only=True, config={"core": {"auth_manager": FAB}})
    with stack:
        # The role first: reserializing DAG ``a`` grants it ``can_read`` on ``DAG:a`` from its access_control.
        _cli(stack, "roles", "create", READER_ROLE)
        _cli(stack, "dags", "reserialize")
        passwords = {"reader": secrets.token_urlsafe(16), "admin": secrets.token_urlsafe(16)}
        for user, role in (("reader", READER_ROLE), ("admin", "Admin")):
            who = ["--username", user, "--role", role, "--password", passwords[user]]
            names = ["--firstname", user, "--lastname", "test", "--email", f"{user}@example.com"]
            _cli(stack, "users", "create", *who, *names)
        yield Page(stack, _seed(stack), passwords)


@pytest.fixture(scope="module")
def simple_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    tmp = tmp_path_factory.mktemp("simple")
    dags = _dags_folder(tmp)
    passwords = {"viewer": secrets.token_urlsafe(16), "admin": secrets.token_urlsafe(16)}
    # The simple auth manager keeps its users' passwords in this file, and generates those it lacks.
    password_file = tmp / "passwords.json"
    password_file.write_text(json.dumps(passwords))
    config = {
        "core": {
            "simple_auth_manager_all_admins": False,
            "simple_auth_manager_users": "viewer:viewer,admin:admin",
            "simple_auth_manager_passwords_file": password_file,
        }
    }
    with AirflowStack(tmp / "airflow", dags, api_server_only=True, config=config) as stack:
        _cli(stack, "dags", "reserialize")
        yield Page(stack, _seed(stack), passwords)


def _dag_ids(endpoint: str, answer: dict[str, Any]) -> set[str]:
    return {row["dag_id"] for row in answer[LISTS[endpoint]]}


def test_fab_user_sees_only_the_rows_of_the_dags_its_role_may_read(fab_page: Page) -> None:
    for endpoint in LISTS:
        status, answer = fab_page.get(endpoint, "reader")
        assert status == 200, (endpoint, answer)
        assert _dag_ids(endpoint, answer) == {"a"}, endpoint
        status, answer = fab_page.get(endpoint, "reader", dag_id="a")
        assert status == 200 and _dag_ids(endpoint, answer) == {"a"}, (endpoint, answer)
    status, charts = fab_page.get("charts", "reader")
    assert status == 200, charts
    assert sum(hit["count"] for hit in charts["rule_hits"]) == fab_page.routed_in_last_day({"a"}) > 0
    status, story = fab_page.get("task", "reader", **fab_page.story_of("a"))
    assert status == 200 and story["events"], story
    assert {event["dag_id"] for event in story["events"]} == {"a"}


def test_fab_user_asking_for_a_dag_its_role_may_not_read_is_refused(fab_page: Page) -> None:
    for endpoint in (*LISTS, "charts"):
        for params in ({"dag_id": "b"}, {"dag_id": "b", "exact": 1}):
            status, answer = fab_page.get(endpoint, "reader", **params)
            assert status == 403, (endpoint, params, status, answer)
    status, answer = fab_page.get("task", "reader", **fab_page.story_of("b"))
    assert status == 403, answer
    # The schedulers' live figures need the cluster-activity view, which this role lacks.
    status, answer = fab_page.get("live", "reader")
    assert status == 403, answer


def test_fab_admin_sees_every_dag(fab_page: Page) -> None:
    for endpoint in LISTS:
        status, answer = fab_page.get(endpoint, "admin")
        assert status == 200 and _dag_ids(endpoint, answer) == {"a", "b"}, (endpoint, answer)
    status, charts = fab_page.get("charts", "admin")
    assert status == 200
    assert sum(hit["count"] for hit in charts["rule_hits"]) == fab_page.routed_in_last_day({"a", "b"})
    status, story = fab_page.get("task", "admin", **fab_page.story_of("b"))
    assert status == 200 and story["events"], story
    status, live = fab_page.get("live", "admin")
    assert status == 200 and "schedulers" in live, live


@pytest.mark.parametrize("user", ["viewer", "admin"])
def test_simple_auth_manager_lets_its_viewer_and_admin_read_every_dag(simple_page: Page, user: str) -> None:
    for endpoint in LISTS:
        status, answer = simple_page.get(endpoint, user)
        assert status == 200 and _dag_ids(endpoint, answer) == {"a", "b"}, (endpoint, answer)
        status, answer = simple_page.get(endpoint, user, dag_id="b", exact=1)
        assert status == 200 and _dag_ids(endpoint, answer) == {"b"}, (endpoint, answer)
    status, charts = simple_page.get("charts", user)
    assert status == 200
    assert sum(hit["count"] for hit in charts["rule_hits"]) == simple_page.routed_in_last_day({"a", "b"})
    status, story = simple_page.get("task", user, **simple_page.story_of("b"))
    assert status == 200 and story["events"], story
    status, live = simple_page.get("live", user)
    assert status == 200 and "schedulers" in live, live


@pytest.mark.parametrize("page", ["fab_page", "simple_page"])
def test_no_token_no_data(page: str, request: pytest.FixtureRequest) -> None:
    served: Page = request.getfixturevalue(page)
    for endpoint in (*LISTS, "charts", "live"):
        status, answer = served.get(endpoint, None)
        assert status == 401, (endpoint, status, answer)
    status, answer = served.get("task", None, **served.story_of("a"))
    assert status == 401, answer

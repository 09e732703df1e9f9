"""The reads behind the Routing page, on SQLite and PostgreSQL: rows as the router writes them, the user's DAG
scope, the search boxes, paging, the charts' buckets and what the router learned."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from hybrid_router.router import audit
from hybrid_router.router.ui import queries
from hybrid_router.router.ui.queries import Filter, LearningSettings

NOW = datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture(params=["sqlite", "postgres"])
def session(request: pytest.FixtureRequest, tmp_path) -> Any:
    from airflow.models import Log

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'page.db'}"
    else:
        url = request.getfixturevalue("postgres_url").replace("postgresql://", "postgresql+psycopg2://", 1)
    engine = create_engine(url)
    Log.__table__.create(engine)  # the page reads Airflow's log table only
    with Session(engine) as db:
        yield db
    engine.dispose()


class Rows:
    """Writes audit rows the way the router does (``audit.AuditLog``), at chosen times."""

    def __init__(self, db: Session) -> None:
        self.db = db

    def add(
        self,
        event: str,
        dag: str,
        task: str,
        *,
        at: datetime = NOW,
        run: str = "r1",
        map_index: int = -1,
        try_number: int = 1,
        **extra: Any,
    ) -> None:
        log = audit.AuditLog()
        key = SimpleNamespace(
            dag_id=dag, task_id=task, run_id=run, map_index=map_index, try_number=try_number
        )
        log.record(event, key, **extra)
        (row,) = log._pending
        row.dttm = at
        self.db.add(row)
        self.db.flush()

    def finished(
        self,
        dag: str,
        task: str,
        executor: str,
        outcome: str,
        *,
        size_mb: int,
        peak_mb: int,
        ms: int,
        **kw: Any,
    ) -> None:
        """A run's end as ``measured_runs.RunRecorder`` writes it (billed as long as it ran)."""
        self.add(
            audit.EVENT_RUN_FINISHED,
            dag,
            task,
            executor=executor,
            outcome=outcome,
            memory_size_mb=size_mb,
            peak_mb=peak_mb,
            duration_ms=ms,
            billed_ms=ms,
            **kw,
        )

    def routed(
        self, dag: str, task: str, executor: str, rule: str, *, how: str = "policy", **kw: Any
    ) -> None:
        overflow_from = "lambda" if how == "overflow" else None
        self.add(
            audit.EVENT_ROUTED,
            dag,
            task,
            executor=executor,
            rule=rule,
            how=how,
            overflow_from=overflow_from,
            reasons=[f"rule '{rule}' sends the task to {executor}"],
            memory_mb=512,
            memory_source="policy_default",
            **kw,
        )


@pytest.fixture
def rows(session: Session) -> Rows:
    return Rows(session)


def test_decisions_are_newest_first_within_the_readable_dags_and_page_without_gaps(session, rows):
    for i in range(7):
        rows.routed("etl", f"t{i}", "lambda", "short")
    rows.routed("secret", "t0", "local", "long")
    everyone = Filter(dags={"etl", "secret"})
    first = queries.decisions(session, everyone, limit=3)
    assert [d["task_id"] for d in first["decisions"]] == ["t0", "t6", "t5"]  # secret's t0 is the newest
    ids: list[int] = []
    before = None
    while True:
        page = queries.decisions(session, Filter(dags={"etl"}), limit=3, before_id=before)
        ids += [d["id"] for d in page["decisions"]]
        assert all(d["dag_id"] == "etl" for d in page["decisions"])
        before = page["next_before_id"]
        if before is None:
            break
    assert len(ids) == len(set(ids)) == 7 and ids == sorted(ids, reverse=True)
    decision = first["decisions"][1]
    assert decision["executor"] == "lambda" and decision["rule"] == "short" and decision["how"] == "policy"
    assert decision["reasons"] == ["rule 'short' sends the task to lambda"]
    assert (
        decision["figures"]["memory_mb"] == 512 and decision["figures"]["memory_source"] == "policy_default"
    )


def test_search_boxes_match_substrings_case_insensitively_and_exact_ids_exactly(session, rows):
    rows.routed("Sales_ETL", "Load_Orders", "lambda", "short")
    rows.routed("sales_etl_v2", "load_orders_100%", "lambda", "short")
    rows.routed("other", "load_orders", "lambda", "short")
    dags = {"Sales_ETL", "sales_etl_v2", "other"}
    found = queries.decisions(session, Filter(dags=dags, dag_id="sales", task_id="ORDERS"))
    assert {d["dag_id"] for d in found["decisions"]} == {"Sales_ETL", "sales_etl_v2"}
    percent = queries.decisions(session, Filter(dags=dags, task_id="100%"))  # a LIKE wildcard is literal
    assert [d["task_id"] for d in percent["decisions"]] == ["load_orders_100%"]
    exact = queries.decisions(session, Filter(dags=dags, dag_id="Sales_ETL", exact=True))
    assert [d["dag_id"] for d in exact["decisions"]] == ["Sales_ETL"]


def test_fallbacks_list_overflows_fallbacks_next_tries_and_exhausted_ones_not_plain_decisions(session, rows):
    rows.routed("etl", "plain", "lambda", "short")
    rows.routed("etl", "spilled", "local", "short", how="overflow")
    rows.add(
        audit.EVENT_FALLBACK,
        "etl",
        "slow",
        executor="local",
        failed_on="lambda",
        reason="timeout",
        detail="Task timed out after 900 s",
        how="fallback",
        rule="short",
        rule_index=0,
        waited_s=0.2,
    )
    rows.add(
        audit.EVENT_FALLBACK_EXHAUSTED,
        "etl",
        "dead",
        failed_on="local",
        reason="never_started",
        why="no fallback executor left",
    )
    rows.add(
        audit.EVENT_NEXT_TRY_ROUTED,
        "etl",
        "retry",
        failed_on="lambda",
        reason="out_of_memory",
        next_executor="lambda_3g",
    )
    got = queries.fallbacks(session, Filter(dags={"etl"}))["fallbacks"]
    assert [(f["task_id"], f["kind"], f["from"], f["to"], f["reason"]) for f in got] == [
        ("retry", "next_try", "lambda", "lambda_3g", "out_of_memory"),
        ("dead", "exhausted", "local", None, "never_started"),
        ("slow", "fallback", "lambda", "local", "timeout"),
        ("spilled", "overflow", "lambda", "local", "no free slot"),
    ]
    assert got[2]["detail"] == "Task timed out after 900 s"


def test_charts_count_rule_hits_per_bucket_and_fallbacks_by_reason_in_the_window(session, rows):
    hour = NOW.replace(minute=0, second=0)
    for minutes in (1, 2, 3):
        rows.routed("etl", "a", "lambda", "short", at=hour - timedelta(hours=2) + timedelta(minutes=minutes))
    rows.routed("etl", "b", "local", "long", at=hour - timedelta(hours=2, minutes=-5))
    rows.routed("etl", "c", "local", "long", at=hour - timedelta(days=3))  # outside 24 h
    rows.routed("secret", "c", "local", "long", at=hour - timedelta(hours=1))  # not readable
    for reason in ("timeout", "timeout", "out_of_memory"):
        rows.add(audit.EVENT_FALLBACK, "etl", "x", failed_on="lambda", executor="local", reason=reason)
    # A row of ours that is not JSON must not break the chart (it counts as no rule).
    rows.add(audit.EVENT_ROUTED, "etl", "odd", at=hour - timedelta(hours=2, minutes=-9))
    session.execute(text("UPDATE log SET extra = 'not json' WHERE task_id = 'odd'"))
    data = queries.charts(session, Filter(dags={"etl"}), hours=24, now=NOW)
    assert data["bucket_s"] == 3600
    bucket = (hour - timedelta(hours=2)).isoformat()
    assert {(h["bucket"], h["rule"], h["count"]) for h in data["rule_hits"]} == {
        (bucket, "short", 3),
        (bucket, "long", 1),
        (bucket, "(none)", 1),
    }
    assert data["fallback_reasons"] == [
        {"reason": "timeout", "count": 2},
        {"reason": "out_of_memory", "count": 1},
    ]
    week = queries.charts(session, Filter(dags={"etl"}), hours=168, now=NOW)
    assert week["bucket_s"] == 6 * 3600 and sum(h["count"] for h in week["rule_hits"]) == 6


def test_task_story_is_every_row_of_one_task_instance_oldest_first(session, rows):
    rows.routed("etl", "hog", "lambda", "short")
    rows.finished("etl", "hog", "lambda", "out_of_memory", size_mb=512, peak_mb=512, ms=900)
    rows.add(
        audit.EVENT_FALLBACK, "etl", "hog", executor="lambda_3g", failed_on="lambda", reason="out_of_memory"
    )
    rows.finished("etl", "hog", "lambda_3g", "success", size_mb=3008, peak_mb=1380, ms=4000)
    rows.routed("etl", "hog", "lambda", "short", map_index=3)  # another task instance
    rows.routed("etl", "hog", "lambda", "short", run="r2")
    story = queries.task_story(session, Filter(dags={"etl"}), dag_id="etl", task_id="hog", run_id="r1")
    kinds = [(e["kind"], e.get("executor") or e.get("to")) for e in story["events"]]
    assert kinds == [
        ("decision", "lambda"),
        ("run_finished", "lambda"),
        ("fallback", "lambda_3g"),
        ("run_finished", "lambda_3g"),
    ]
    assert story["events"][3]["peak_mb"] == 1380
    hidden = queries.task_story(session, Filter(dags={"other"}), dag_id="etl", task_id="hog", run_id="r1")
    assert hidden == {"events": []}


def test_learned_needs_follow_the_policys_settings_and_out_of_memory_deaths(session, rows):
    for peak in (100, 200, 300, 400, 500):
        rows.finished("etl", "steady", "lambda", "success", size_mb=1024, peak_mb=peak, ms=peak * 10)
    rows.finished("etl", "hog", "lambda", "out_of_memory", size_mb=512, peak_mb=512, ms=900)
    rows.finished("secret", "hog", "lambda", "success", size_mb=512, peak_mb=100, ms=900)
    got = queries.learned(
        session, Filter(dags={"etl"}), LearningSettings(memory_headroom=1.5, learn_after_runs=5)
    )
    by_task = {t["task_id"]: t for t in got["tasks"]}
    assert set(by_task) == {"steady", "hog"}
    assert by_task["steady"]["memory_mb_p95"] == 480 and by_task["steady"]["memory_need_mb"] == 720
    assert by_task["steady"]["memory_source"] == "720 MB: p95 of 5 runs x 1.5"
    assert by_task["steady"]["duration_s_p95"] == pytest.approx(4.8)
    assert by_task["hog"]["memory_need_mb"] == 513
    assert by_task["hog"]["out_of_memory"]["executor"] == "lambda"
    fewer = queries.learned(
        session, Filter(dags={"etl"}, task_id="steady"), LearningSettings(learn_after_runs=6)
    )
    assert fewer["tasks"][0]["memory_need_mb"] is None


def test_a_row_is_parsed_whatever_its_extra_holds():
    odd = SimpleNamespace(
        id=1,
        dttm=None,
        event=audit.EVENT_ROUTED,
        dag_id="d",
        task_id="t",
        run_id="r",
        map_index=-1,
        try_number=1,
        extra="[1, 2]",
    )
    assert queries.decision_row(odd)["executor"] is None
    broken = SimpleNamespace(**{**vars(odd), "event": audit.EVENT_FALLBACK, "extra": "{not json"})
    assert queries.fallback_row(broken)["reason"] is None
    assert json.dumps(queries.story_row(broken))  # what the page receives stays JSON


def test_learned_says_when_it_shows_fewer_tasks_than_there_are(session, rows, monkeypatch):
    monkeypatch.setattr(queries, "MAX_LEARNED_TASKS", 2)
    for task in ("a", "b", "c"):
        rows.finished("etl", task, "lambda", "success", size_mb=512, peak_mb=100, ms=900)
    got = queries.learned(session, Filter(dags={"etl"}), LearningSettings())
    assert [t["task_id"] for t in got["tasks"]] == ["a", "b"]
    assert got["total_tasks"] == 3 and got["truncated"] is True
    narrowed = queries.learned(session, Filter(dags={"etl"}, task_id="c"), LearningSettings())
    assert [t["task_id"] for t in narrowed["tasks"]] == ["c"] and narrowed["truncated"] is False

"""The Routing page's FastAPI app, mounted by Airflow's API server at ``/hybrid-router`` (``plugin.py``).

The page itself is static; its data comes from the JSON endpoints under ``/api``. Each endpoint needs an
authenticated Airflow user (the UI's ``_token`` cookie or a bearer token: Airflow's own ``get_user``), and the
configured auth manager decides what that user sees: DAG-scoped rows only for the DAGs it lets the user read
(``get_authorized_dag_ids``), 403 for a ``dag_id`` it does not, and the schedulers' live figures only with
access to the cluster-activity view.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_view
from cachetools import TTLCache, cached
from fastapi import Depends, FastAPI, HTTPException, Query, status
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from hybrid_router.router.ui import queries
from hybrid_router.router.ui.queries import Filter, LearningSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# A scheduler that has not published for this long is shown as stale (it publishes about once a second).
STALE_AFTER_S = 30.0

app = FastAPI(
    title="Hybrid router: routing",
    description="Why each task ran where it did, how full each executor is, and what fell back.",
    docs_url=None,
    redoc_url=None,
)
app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.get("/", include_in_schema=False)
def page() -> FileResponse:
    # The shell holds no data: it is the same for every user, and its JSON calls carry the auth.
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def readable_dags(user: GetUserDep, session: SessionDep) -> set[str]:
    return get_auth_manager().get_authorized_dag_ids(user=user, method="GET", session=session)


ReadableDags = Annotated[set[str], Depends(readable_dags)]


def _filter(dags: set[str], dag_id: str, task_id: str, run_id: str = "", exact: bool = False) -> Filter:
    # A DAG named exactly that the user may not read is refused, whether it was a search or an exact id: the
    # answer must not look like "no routing rows" for a DAG that has some.
    if dag_id and dag_id not in dags and (exact or run_id or dag_id in _all_dag_ids()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"You may not read DAG {dag_id!r}")
    return Filter(dags=dags, dag_id=dag_id, task_id=task_id, run_id=run_id, exact=exact)


def _all_dag_ids() -> set[str]:
    from airflow.models import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session(scoped=False) as session:
        return set(session.scalars(select(DagModel.dag_id)))


def search(
    dags: ReadableDags, dag_id: str = "", task_id: str = "", run_id: str = "", exact: bool = False
) -> Filter:
    """The search every DAG-scoped list and chart takes, within the DAGs the user may read."""
    return _filter(dags, dag_id, task_id, run_id, exact)


Search = Annotated[Filter, Depends(search)]
PageSize = Annotated[int, Query(ge=1, le=queries.MAX_PAGE)]


@app.get("/api/decisions")
def get_decisions(
    where: Search, session: SessionDep, limit: PageSize = 100, before_id: int | None = None
) -> dict[str, Any]:
    return queries.decisions(session, where, limit=limit, before_id=before_id)


@app.get("/api/fallbacks")
def get_fallbacks(
    where: Search, session: SessionDep, limit: PageSize = 100, before_id: int | None = None
) -> dict[str, Any]:
    return queries.fallbacks(session, where, limit=limit, before_id=before_id)


@app.get("/api/charts")
def get_charts(
    where: Search, session: SessionDep, hours: Annotated[float, Query(gt=0, le=24 * 31)] = 24
) -> dict[str, Any]:
    return queries.charts(session, where, hours=hours)


@app.get("/api/learned")
def get_learned(where: Search, session: SessionDep) -> dict[str, Any]:
    return queries.learned(session, where, learning_settings())


@app.get("/api/task")
def get_task(
    dags: ReadableDags, session: SessionDep, dag_id: str, task_id: str, run_id: str, map_index: int = -1
) -> dict[str, Any]:
    where = _filter(dags, dag_id, task_id, run_id, exact=True)
    return queries.task_story(
        session, where, dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index
    )


@app.get("/api/live", dependencies=[Depends(requires_access_view(AccessView.CLUSTER_ACTIVITY))])
def get_live(session: SessionDep) -> dict[str, Any]:
    from hybrid_router.router.live_state import read_live_states

    now = datetime.now(timezone.utc)
    schedulers = []
    for live in read_live_states(session):
        age = (now - live.published_at).total_seconds()
        state = live.state
        schedulers.append(
            {
                "scheduler": live.scheduler,
                "hostname": live.hostname,
                "job_id": live.job_id,
                "published_at": live.published_at.isoformat(),
                "age_s": round(age, 1),
                "stale": age > STALE_AFTER_S,
                "waiting": state.get("waiting", 0),
                "executors": state.get("executors", []),
            }
        )
    schedulers.sort(key=lambda item: (item["stale"], item["scheduler"]))
    return {"now": now.isoformat(), "schedulers": schedulers}


@cached(TTLCache(maxsize=1, ttl=60))
def learning_settings() -> LearningSettings:
    """The policy's learning settings, read again at most once a minute; the defaults when it cannot be read."""
    from hybrid_router.router.config import RouterConfig
    from hybrid_router.router.policy import load_policy

    try:
        config = RouterConfig.from_airflow_conf()
        policy = load_policy(config.policy_file)
    except Exception as err:
        log.warning("The Routing page shows learned needs with default settings: %s", err)
        return LearningSettings()
    return LearningSettings(
        days=config.history_days or LearningSettings.days,
        memory_headroom=policy.memory_headroom,
        learn_after_runs=policy.learn_after_runs,
    )

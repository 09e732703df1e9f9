"""The Airflow plugin the provider registers (``get_provider_info()["plugins"]``): the Routing page's app on the
API server, a "Routing" entry in the UI's navigation, and a "Routing" tab on each task instance."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/hybrid-router"
PAGE = f"{URL_PREFIX}/"


class _RoutingApp:
    """``fastapi_apps``, built when read: Airflow reads plugin attributes from the class, and only the API server
    reads this one; schedulers and workers load plugins too and must not import a web app for nothing."""

    def __get__(self, instance: object, owner: type) -> list[dict[str, object]]:
        from hybrid_router.router.ui.api import app

        return [{"app": app, "url_prefix": URL_PREFIX, "name": "Hybrid router: routing"}]


class RoutingPlugin(AirflowPlugin):
    """Registers the Routing page with Airflow's API server and UI (no second server)."""

    name = "hybrid_router"
    fastapi_apps = _RoutingApp()  # type: ignore[assignment]
    external_views = [
        {
            "name": "Routing",
            "href": PAGE,
            "destination": "nav",
            "url_route": "hybrid-router",
        },
        {
            "name": "Routing",
            "href": f"{PAGE}?dag_id={{DAG_ID}}&task_id={{TASK_ID}}&run_id={{RUN_ID}}&map_index={{MAP_INDEX}}",
            "destination": "task_instance",
            "url_route": "hybrid-router-task",
        },
    ]

"""The routing executor, the policy engine and the CLI.

``RoutingExecutor`` is imported lazily so that the policy engine and the ``airflow hybrid-router`` commands,
which import this package on every ``airflow`` call, do not pull in Airflow's executor machinery.
``[core] executor = hybrid_router.router.RoutingExecutor`` resolves through ``__getattr__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hybrid_router.router.executor import RoutingExecutor

__all__ = ["RoutingExecutor"]


def __getattr__(name: str) -> Any:
    if name == "RoutingExecutor":
        from hybrid_router.router.executor import RoutingExecutor

        return RoutingExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The Lambda path: executor, in-Lambda handler and a local Lambda service.

``LambdaExecutor`` is loaded on first access: the in-Lambda handler imports this package on every cold start
and must not pay for Airflow's executor machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hybrid_router.lambda_exec.executor import LambdaExecutor

__all__ = ["LambdaExecutor"]


def __getattr__(name: str) -> Any:
    if name == "LambdaExecutor":
        from hybrid_router.lambda_exec.executor import LambdaExecutor

        return LambdaExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

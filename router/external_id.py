"""The router's ``external_executor_id``: ``<child>`` or ``<child>|<the child's own id>``.

Adoption after a restart reads the child's name back from it and hands the child its own id. No Airflow import,
so the demo and other tools read it without loading Airflow's configuration.
"""

from __future__ import annotations

from typing import Any

SEPARATOR = "|"


def join_child_id(child: str, child_info: Any) -> str:
    """The external id the router stores for a task its child ``child`` runs (``child_info``: the child's id)."""
    if child_info in (None, ""):
        return child
    return f"{child}{SEPARATOR}{child_info}"


def split_child_id(value: str | None) -> tuple[str | None, str | None]:
    """``(child name, the child's own id or None)`` of an ``external_executor_id`` the router wrote."""
    if not value:
        return None, None
    child, sep, rest = value.partition(SEPARATOR)
    return child, (rest if sep else None)

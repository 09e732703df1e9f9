"""A task's log as the child that ran the try adds to it (the Lambda function's own log, say).

The child is the one named in the task instance's ``external_executor_id`` (``external_id.py``), and only for
the try that id was written for: Airflow keeps the id from one try to the next, and an earlier try's run is not
this try's log. The child reads the task instance with its own id there, as it wrote it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hybrid_router.redaction import scrub, traceback_text
from hybrid_router.router import audit
from hybrid_router.router.external_id import parse_external_id

if TYPE_CHECKING:
    from hybrid_router.router.children import Child

log = logging.getLogger(__name__)


class TaskInstanceWithChildId:
    """A task instance as its child knows it: the child's own external id, without the router's prefix."""

    def __init__(self, ti: Any, external_executor_id: str | None) -> None:
        self._ti = ti
        self.external_executor_id = external_executor_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ti, name)


def read_child_log(
    ti: Any, try_number: int, reader_for: Callable[[str], Child | None]
) -> tuple[list[str], list[str]]:
    """``(sources, lines)`` from the child named for ``try_number`` in ``ti``'s external id; never raises.

    ``reader_for`` gives a child by name (None when the policy has no such child). What went wrong is shown
    in the log view and logged with the child's secret option values scrubbed (a ``ChildConfigError`` from
    building the child has none to scrub).
    """
    parsed = parse_external_id(getattr(ti, "external_executor_id", None))
    if parsed is None or parsed.child is None or not parsed.is_for_try(try_number):
        return [], []
    reader = None
    try:
        reader = reader_for(parsed.child)
        if reader is None:
            return [], []
        return reader.executor.get_task_log(TaskInstanceWithChildId(ti, parsed.child_info), try_number)
    except Exception as err:
        secrets = reader.masked_values if reader is not None else ()
        log.error(
            "Reading the log of %s from executor %s failed: %s",
            ti,
            parsed.child,
            traceback_text(err, secrets),
        )
        return [], [audit.log_read_failed(parsed.child, scrub(str(err), secrets))]

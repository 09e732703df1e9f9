"""The router's ``external_executor_id``: which child runs which try of a task, and the child's own id for it.

``<child>@<try>`` or ``<child>@<try>|<the child's own id>``; ``(router)@<try>`` while the router itself holds the
try (waiting for room, or for a fallback executor). Airflow keeps a task instance's ``external_executor_id``
from one try to the next, so the try number is what tells adoption after a restart that an id is the current
try's and not a leftover of an earlier run. Ids written before the try was recorded (``<child>`` or
``<child>|<id>``) still parse, with no try. No Airflow import, so the demo and other tools read it without
loading Airflow's configuration.
"""

from __future__ import annotations

from typing import Any, NamedTuple

SEPARATOR = "|"
TRY_MARK = "@"
# Not a valid executor name in a policy (names start with a letter or '_'), so never read as a child's.
ROUTER = "(router)"


class RouterExternalId(NamedTuple):
    child: str | None  # None: the router holds the try, no child has been handed it
    try_number: int | None  # None: written by a version that did not record it
    child_info: str | None  # the child's own id, as the child reported it

    def is_for_try(self, try_number: int) -> bool:
        """Whether this id may describe ``try_number``'s run: the same try, or an old id that does not say."""
        return self.try_number is None or self.try_number == try_number


def join_child_id(child: str, child_info: Any, *, try_number: int) -> str:
    """The external id of try ``try_number`` run by child ``child`` (``child_info``: the child's own id)."""
    head = f"{child}{TRY_MARK}{try_number}"
    if child_info in (None, ""):
        return head
    return f"{head}{SEPARATOR}{child_info}"


def router_held_id(try_number: int) -> str:
    """The external id of a try the router holds: no child's id, so adoption never hands it to a child."""
    return f"{ROUTER}{TRY_MARK}{try_number}"


def parse_external_id(value: str | None) -> RouterExternalId | None:
    """The parts of an ``external_executor_id`` the router wrote, in either format; None for no id."""
    if not value:
        return None
    head, sep, rest = value.partition(SEPARATOR)
    child_info = rest if sep else None
    name, mark, try_text = head.partition(TRY_MARK)
    if not (mark and try_text.isdigit()):
        return RouterExternalId(head, None, child_info)  # the format without the try
    return RouterExternalId(None if name == ROUTER else name, int(try_text), child_info)


def split_child_id(value: str | None) -> tuple[str | None, str | None]:
    """``(child name, the child's own id or None)`` of an ``external_executor_id`` the router wrote."""
    parsed = parse_external_id(value)
    if parsed is None:
        return None, None
    return parsed.child, parsed.child_info

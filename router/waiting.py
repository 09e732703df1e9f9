"""The tasks the router holds: why and since when each waits for room, which child takes it, who owns it now.

The choice of a child for a waiting task is made here (``Room``): a free slot on any candidate first, then
room in a candidate's own queue (its ``prefetch``, see ``prefetch_room``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hybrid_router.router import audit

if TYPE_CHECKING:
    from hybrid_router.child_protocol import InfrastructureFailure
    from hybrid_router.router.children import Child
    from hybrid_router.router.policy import Decision

# A workload's execution-API token lives ``[scheduler] task_queued_timeout`` from when the scheduler made
# it: one that waited in the router longer than this gets a new token before it is handed to a child.
TOKEN_REFRESH_AFTER_S = 60.0
# A task waiting in the router is QUEUED in the database, where the scheduler's stuck-in-queued check would
# fail it: its ``queued_dttm`` is moved on this often while it waits, so lack of room never fails a task.
KEEP_WAITING_ALIVE_EVERY_S = 60.0


class PendingKind(enum.Enum):
    """Why a task waits in the router for a child with room."""

    ROUTED = "routed"  # a new try, to the policy's executor or an overflow executor
    FALLBACK = "fallback"  # the same try again, after its run died for infrastructure reasons
    NEXT_TRY = "next_try"  # a later try, to the fallback executor its previous try's death chose


@dataclass
class Pending:
    """A task waiting inside the router for one of ``candidates`` to have room."""

    candidates: tuple[str, ...]
    decision: Decision | None  # None only for an adopted task whose decision could not be made again
    kind: PendingKind = PendingKind.ROUTED
    since: float = 0.0
    failure: InfrastructureFailure | None = None  # what killed the previous run (FALLBACK only)
    failed_on: str | None = None  # where the previous run died (FALLBACK and NEXT_TRY)
    announced_wait: bool = False
    kept_alive_at: float = 0.0

    def dispatch_notice(self, target: str, *, now: float) -> audit.Notice:
        """What the task log and the audit log say when ``target`` takes this task."""
        if self.kind is PendingKind.FALLBACK:
            return audit.fallback_dispatched(
                self.decision, target, self.failure, failed_on=self.failed_on, waited_s=now - self.since
            )
        if self.kind is PendingKind.NEXT_TRY:
            return audit.routed_next_try(
                self.decision, target, first_choice=self.candidates[0], failed_on=self.failed_on
            )
        return audit.routed(self.decision, target, first_choice=self.candidates[0])


@dataclass
class Assignment:
    """Which child owns a key now, and what is left to try should it die there."""

    ti_id: Any
    decision: Decision | None  # None for a task adopted after a restart until it is needed again
    child: str | None = None  # None while waiting for a fallback executor with room
    tried: list[str] = field(default_factory=list)
    fallbacks_used: int = 0
    log_path: str | None = None


def prefetch_room(child: Child, decisions: Iterable[Decision | None], *, task_queued_timeout_s: float) -> int:
    """Room in ``child``'s own queue (its ``prefetch``), open only while every task it holds ends soon.

    ``decisions`` are those of the tasks the child holds. A prefetched task waits behind them, out of the
    router's reach, while its token and the stuck-in-queued clock run ``[scheduler] task_queued_timeout``: so
    it is prefetched only behind tasks whose ``expected_duration`` is at most a fifth of that.
    """
    if child.prefetch <= 0:
        return 0
    behind_at_most_s = task_queued_timeout_s / 5
    for decision in decisions:
        if decision is None or decision.expected_duration_s > behind_at_most_s:
            return 0
    return child.prefetch_slots()


class Room:
    """The room on each child during one dispatch pass, used up as tasks are handed out.

    A candidate that can start a task now wins over one that would hold it in its own queue, so a task
    overflows to a free slot rather than wait in its first choice's queue.
    """

    def __init__(self, children: Mapping[str, Child], queue_room: Callable[[Child], int]) -> None:
        self._children = children
        self._free = {name: child.free_slots() for name, child in children.items()}
        self._queue_room_of = queue_room
        # Measured on first need only, after this pass's earlier dispatches joined the children's in_flight.
        self._queue_room: dict[str, int] | None = None

    def take(self, candidates: Sequence[str]) -> str | None:
        """The first candidate with a free slot, else the first with queue room; None when none has room."""
        target = next((name for name in candidates if self._free.get(name, 0) > 0), None)
        if target is not None:
            self._free[target] -= 1
            return target
        if self._queue_room is None:
            self._queue_room = {name: self._queue_room_of(child) for name, child in self._children.items()}
        target = next((name for name in candidates if self._queue_room.get(name, 0) > 0), None)
        if target is not None:
            self._queue_room[target] -= 1
        return target

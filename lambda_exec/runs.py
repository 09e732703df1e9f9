"""Run binding: which delivered copy of a dispatch's event speaks for the task.

Two live runs can share one dispatch: AWS delivers async events at least once, and an Invoke whose answer was
lost (5xx, read timeout) is sent again. Each run is named by the handler (``ResultMessage.run_id``) and the
execution API lets only one of them claim the task (its ``/run`` succeeds; the others get 409 and report
``NOT_CLAIMED``). A dispatch is bound to the first run known to have claimed it (its STARTED, or a FINISHED with
``claimed``); from then on the results of every other run are recorded and ignored. Results of runs that never
held the task (``NOT_CLAIMED``, ``EVENT_EXPIRED``) never decide the task's state.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING

from hybrid_router.lambda_exec.protocol import UNCLAIMED_OUTCOMES, Outcome, Phase, ResultMessage

if TYPE_CHECKING:
    from hybrid_router.lambda_exec.dispatch import Dispatch

log = logging.getLogger(__name__)


class Verdict(str, Enum):
    OWN = "own"  # the bound run's (or, for a dispatch not bound yet, the run that binds it now): apply it
    UNBOUND = "unbound"  # a run that ended without claiming, and no run is bound: the best word there is
    NOT_CLAIMED = "not_claimed"  # a run that never held the task: changes nothing
    OTHER_RUN = "other_run"  # another run than the bound one: recorded and ignored


def claims(result: ResultMessage) -> bool:
    """Whether ``result`` says its run holds the task. A handler older than run ids (no ``run_id``) did not say:
    any of its results but the unclaimed outcomes is taken as its run's, as before."""
    if result.phase is Phase.STARTED or result.claimed:
        return True
    return not result.run_id and result.outcome not in UNCLAIMED_OUTCOMES


def judge(dispatch: Dispatch, result: ResultMessage) -> Verdict:
    """What ``result`` means for ``dispatch``; binds the dispatch to the result's run when it is the first claim."""
    if dispatch.run_id is not None:
        return Verdict.OWN if result.run_id == dispatch.run_id else Verdict.OTHER_RUN
    if claims(result):
        dispatch.run_id = result.run_id
        return Verdict.OWN
    if result.outcome in UNCLAIMED_OUTCOMES:
        return Verdict.NOT_CLAIMED
    return Verdict.UNBOUND


def ignore(dispatch: Dispatch, result: ResultMessage, verdict: Verdict, now: float) -> str:
    """Record a result that changes nothing for the task (``OTHER_RUN`` or ``NOT_CLAIMED``): log it (another
    run's once per run) and return the name of its metric."""
    if verdict is Verdict.OTHER_RUN:
        if result.run_id not in dispatch.other_runs:
            dispatch.other_runs.add(result.run_id)
            log.warning(
                "Ignoring the results of run %s of %s: dispatch %s is bound to run %s (%s %s)",
                result.run_id or "?",
                dispatch.key,
                dispatch.dispatch_id,
                dispatch.run_id or "?",
                result.phase.value,
                result.outcome.value if result.outcome else "",
            )
        return "other_run_result"
    assert result.outcome is not None
    log.info(
        "Run %s of %s did not take the task: %s %s",
        result.run_id or "?",
        dispatch.key,
        result.outcome.value,
        result.detail,
    )
    if result.outcome is Outcome.EVENT_EXPIRED and dispatch.expired_seen_at is None:
        dispatch.expired_seen_at = now  # no copy of the event can start a run any more (``dead_after``)
    return f"run_{result.outcome.value}"


def dead_after(dispatch: Dispatch, function_timeout_s: float) -> float | None:
    """The moment after which no run of ``dispatch`` can act any more (None: not known yet)."""
    if dispatch.started_at is None:
        if dispatch.expired_seen_at is not None:
            # A copy came too late to run: no copy can start a run now, and one that claimed before not_after
            # has reported STARTED by then (or stopped itself, ``started_notice``).
            return max(dispatch.not_after, dispatch.expired_seen_at)
        # A copy delivered just before not_after may run the task until the function's timeout.
        return dispatch.not_after + function_timeout_s
    # The bound run ends by its timeout; until not_after a copy could still take a task reset to QUEUED.
    return max(dispatch.started_at + function_timeout_s, dispatch.not_after)


def is_dead(now: float, dead_after: float | None, grace_s: float, receive_ok_at: float | None) -> bool:
    """Whether to declare a dispatch dead: past ``dead_after`` + ``grace_s``, and a results receive that began
    after that worked (a missing message proves nothing while receives fail)."""
    if dead_after is None:
        return False
    deadline = dead_after + grace_s
    return now > deadline and receive_ok_at is not None and receive_ok_at >= deadline

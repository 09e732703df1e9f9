"""When a dispatch is dead: no run of it can act on its task any more, so its try may go elsewhere.

Positive signs come first, as soon as they are known:

- the handler's own reports: ``TIMEOUT`` when it stopped the task before the function's deadline, ``UNREPORTED``
  when it stopped a run it could not report (applied as they arrive, ``executor._apply_result``);
- a dead letter: Lambda gave up on the event (``executor._apply_inbound``);
- a run's heartbeat stopping while the results queue is read: an event asks its run for a lease
  (``event_lease``); the run sends STARTED again every ``heartbeat_s`` and stops itself once it could send none
  for ``lease_s`` (``started_notice``). The executor renews the lease from the moment it takes each STARTED
  (``renew``), never earlier than the run's own count, which starts before the send. So when the lease has run
  out here and a receive that began after that came back empty (every message sent before it has been seen), the
  run has stopped: its sandbox died without a word (killed, crashed, frozen) or it fenced itself. Nothing but
  an empty receive counts: a receive that fails, or a full batch that may leave the run's STARTED behind, only
  delays the verdict, so a run whose results are delayed is never declared dead.

Without any of these, the watchdog's bound (``runs.dead_after``): no run can act once the event's ``not_after``
and the function's timeout have passed, which a results receive that began after that confirms.

Why the heartbeat travels through SQS rather than being read from the task instance's ``last_heartbeat_at``
(which Airflow's supervisor renews every ``[workers] min_heartbeat_interval``): a supervisor that cannot reach
the API server keeps its task running for ``[workers] max_failed_heartbeats`` heartbeats, each with the client's
own retries (minutes with the defaults, and set in the function's image, not here), so a stale
``last_heartbeat_at`` is no sign that the run stopped; the lease is one the handler keeps itself.
Airflow's own scheduler fails a task whose ``last_heartbeat_at`` is older than ``[scheduler]
task_instance_heartbeat_timeout`` (300 s), spending a retry and bypassing the fallback: the lease (3 heartbeats,
90 s by default) ends well before that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybrid_router.lambda_exec import runs
from hybrid_router.lambda_exec.dispatch import DispatchState
from hybrid_router.lambda_exec.protocol import Outcome, ResultMessage

if TYPE_CHECKING:
    from hybrid_router.lambda_exec.dispatch import Dispatch
    from hybrid_router.lambda_exec.inbox import Reads

# A run's lease lasts this many heartbeats: two STARTED in a row may fail before it stops itself.
LEASE_HEARTBEATS = 3
# After the watchdog's bound (which compares this host's clock with Lambda's) a dispatch is declared dead this
# much later: room for clock skew, and for the last message to travel through SQS.
WATCHDOG_GRACE_S = 15.0
# After a lease ends here: room for a STARTED another scheduler's reader held at that moment. No clock skew: the
# run counts its lease on its own clock, this executor from when it took the message.
LEASE_GRACE_S = 5.0


def event_lease(heartbeat_s: float) -> dict[str, float]:
    """What an event asks of its run (``InvokeEvent.heartbeat_s``, ``lease_s``): nothing when ``heartbeat_s`` is 0."""
    return {"heartbeat_s": heartbeat_s, "lease_s": LEASE_HEARTBEATS * heartbeat_s}


def renew(dispatch: Dispatch, result: ResultMessage, now: float) -> None:
    """A STARTED of the bound run, taken at ``now``: the run was alive when it began to send it."""
    if result.lease_s > 0:
        dispatch.lease_s = result.lease_s
        dispatch.renewed_at = now if dispatch.renewed_at is None else max(dispatch.renewed_at, now)


def death(
    dispatch: Dispatch, now: float, function_timeout_s: float, reads: Reads
) -> tuple[Outcome, str] | None:
    """Why ``dispatch`` is dead (the outcome and a sentence), or None while a run of it may still act."""
    if dispatch.state not in (DispatchState.ACCEPTED, DispatchState.STARTED):
        return None
    renewed_at = dispatch.renewed_at
    if dispatch.lease_s and renewed_at is not None:
        if runs.is_dead(now, renewed_at + dispatch.lease_s, LEASE_GRACE_S, reads.drained_at):
            return Outcome.RUNTIME_CRASH, (
                f"no heartbeat from run {dispatch.run_id or '?'} for {now - renewed_at:.0f}s while its results "
                f"were read (it stops itself {dispatch.lease_s:g}s after its last): its sandbox stopped without "
                "a report"
            )
    if not runs.is_dead(now, runs.dead_after(dispatch, function_timeout_s), WATCHDOG_GRACE_S, reads.ok_at):
        return None
    if dispatch.state is DispatchState.ACCEPTED:
        return (
            Outcome.EVENT_EXPIRED,
            "no run claimed the task before the event's not_after; the handler refuses it since",
        )
    assert dispatch.started_at is not None
    return Outcome.TIMEOUT, (
        f"no result {now - dispatch.started_at:.0f}s after the run started (function timeout {function_timeout_s}s)"
    )

"""The handler's STARTED report: held back for a grace and until the run claimed its task, sent with retries,
and the run stopped if it cannot be.

The executor takes "no STARTED" as "not running": an accepted event whose run never reported is declared dead
at its ``not_after`` plus a grace, and its try goes to another executor. So a run that cannot report STARTED must
not go on: it keeps trying (with back-off, on top of botocore's own retries) until ``confirm_by``, then the
handler stops it as it does at the deadline and reports ``Outcome.UNREPORTED``.

STARTED also says "this run holds the task" (``claimed``): it waits for the execution API's answer to the run's
``/run`` (``claim``). A run refused there (another copy of the event holds the task) sends no STARTED and is
never stopped as unreported: it ends by itself and reports ``NOT_CLAIMED``. A run whose answer has not come by
``confirm_by`` is stopped like one that cannot send STARTED.

Once STARTED is out, an event that asks for it (``heartbeat_s``, ``lease_s``) gets a lease: STARTED is sent again
every ``heartbeat_s``, and a run that could send none for ``lease_s`` is stopped (``UNREPORTED``) so that it has
stopped by the time its lease ends. The executor can then read a run's silence, while its own receives work, as
a positive sign that the run no longer acts: its sandbox died without a word (killed, crashed, frozen), or it
fenced itself (``liveness``). Without the lease a killed sandbox with no dead letter is only noticed once the
function's timeout has passed.

Standard library only: the handler imports this module on every cold start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.claim import CLAIMED, REFUSED
from hybrid_router.lambda_exec.process_tree import FREEZE_TIMEOUT_S, POLL_INTERVAL_S, TERMINATE_GRACE_S
from hybrid_router.lambda_exec.protocol import InvokeEvent, Phase

log = logging.getLogger(__name__)
# Lambda's runtime leaves the root logger at WARNING: our progress lines belong in the function's log.
log.setLevel(logging.INFO)

# How long after the grace a run may go on while its STARTED cannot be sent (each try already holds botocore's
# own retries). Never past the event's not_after: the executor may give the try to another executor soon after.
CONFIRM_WINDOW_S = 30.0
FIRST_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 5.0
# How often the notice looks for the run's claim once STARTED is due.
CLAIM_POLL_S = 0.05
# How long before its lease ends a run that could not renew it is stopped: the handler's stop (freeze the
# supervisor, the task's on_kill, kill the tree) must be over by then, and noticed within a poll.
LEASE_STOP_S = FREEZE_TIMEOUT_S + TERMINATE_GRACE_S + 10 * POLL_INTERVAL_S


class Reporter(Protocol):
    """What the notice needs of ``handler.ResultReporter``: a send that raises when it fails."""

    def send(self, phase: Phase, *, started_at: float, claimed: bool = False) -> Any: ...


class StartedNotice:
    """Reports STARTED once the run has lasted ``grace_s``, so that a short run sends FINISHED alone.

    Each result is one SQS message the executor must receive and delete; FINISHED carries ``started_at``, so
    for a run shorter than the grace STARTED says nothing the executor cannot learn from FINISHED (and a run
    that ended within the grace had nothing left to stop). A longer run reports STARTED ``grace_s`` late; a
    failed send is tried again with back-off until ``confirm_by`` (wall-clock; by default ``CONFIRM_WINDOW_S``
    after the grace, never after ``not_after``). After that, or once a send is refused for good (a missing
    queue, a denied permission), ``unconfirmed()`` is true and the handler stops the run.

    STARTED waits for ``claim()`` to say ``CLAIMED``; with ``REFUSED`` none is sent and the run is never
    unconfirmed. Without ``claim`` the run counts as claimed from the start. With ``grace_s == 0`` STARTED is
    sent as soon as the run claimed the task; if that is known already, ``arm`` sends it, with the same retries,
    and raises if it cannot be sent (then nothing should run).

    With ``heartbeat_s`` and ``lease_s`` STARTED is sent again every ``heartbeat_s`` once sent (a failed send is
    tried again sooner), and ``unconfirmed()`` turns true ``LEASE_STOP_S`` before ``lease_s`` has passed since
    the start of the last send that worked. The lease counts from a send's start, before the message exists, so
    the executor, counting from when it took the message, never sees the lease end before the run stopped.
    """

    def __init__(
        self,
        reporter: Reporter,
        started_at: float,
        grace_s: float,
        *,
        not_after: float | None = None,
        confirm_window_s: float | None = None,
        claim: Callable[[], str | None] | None = None,
        heartbeat_s: float = 0.0,
        lease_s: float = 0.0,
    ):
        self._reporter = reporter
        self._started_at = started_at
        self._grace_s = grace_s
        self._due_at = started_at + grace_s
        confirm_by = self._due_at + (CONFIRM_WINDOW_S if confirm_window_s is None else confirm_window_s)
        self.confirm_by = confirm_by if not_after is None else min(confirm_by, not_after)
        self._cancelled = threading.Event()
        self._gave_up = threading.Event()
        self._thread: threading.Thread | None = None
        self._claim = claim or (lambda: CLAIMED)
        self._heartbeat_s = heartbeat_s
        self._lease_s = lease_s if heartbeat_s > 0 else 0.0
        self._renewed_at: float | None = None  # monotonic start of the last STARTED sent
        self.sent = False
        self.renewals = 0

    def arm(self) -> None:
        target = self._send_after_grace
        if self._grace_s <= 0 and self._claim() == CLAIMED:
            error = self._send_until_confirmed()
            if error is not None:
                raise error
            if not self._lease_s:
                return
            target = self._renew
        self._thread = threading.Thread(target=target, name="started-notice", daemon=True)
        self._thread.start()

    def unconfirmed(self) -> bool:
        """True once the run must be stopped: STARTED is due and could not be sent in time, or ever; or its lease
        is about to end unrenewed."""
        if self.sent:
            renewed_at = self._renewed_at
            return (
                bool(self._lease_s)
                and renewed_at is not None
                and (time.monotonic() >= renewed_at + self._lease_s - LEASE_STOP_S)
            )
        if time.time() < self._due_at or self._claim() == REFUSED:
            return False
        return self._gave_up.is_set() or time.time() >= self.confirm_by

    def settle(self) -> None:
        """The run is over: STARTED is no longer sent, or, if it is being sent, has been sent on return."""
        self._cancelled.set()
        if self._thread is not None:
            self._thread.join()

    def _send_after_grace(self) -> None:
        if self._cancelled.wait(self._grace_s):
            return
        while (state := self._claim()) != CLAIMED:
            if state == REFUSED or self._cancelled.wait(CLAIM_POLL_S):
                return  # another run holds the task, or this one ended: FINISHED says all there is to say
        self._send_until_confirmed()
        if self.sent:
            self._renew()

    def _renew(self) -> None:
        """Send STARTED again every heartbeat until the run ends; a failed send is tried again sooner, as the
        lease runs on. The reporter logs each failure."""
        if not self._lease_s:
            return
        delay = FIRST_RETRY_DELAY_S
        wait = self._heartbeat_s
        while not self._cancelled.wait(max(0.0, wait)):
            began = time.monotonic()
            try:
                self._reporter.send(Phase.STARTED, started_at=self._started_at, claimed=True)
            except Exception:
                wait = min(delay, self._heartbeat_s)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                continue
            self._renewed_at = began
            self.renewals += 1
            delay = FIRST_RETRY_DELAY_S
            wait = began + self._heartbeat_s - time.monotonic()

    def _send_until_confirmed(self) -> Exception | None:
        """Send STARTED, trying again until ``confirm_by``; the last error if it could not be sent."""
        delay = FIRST_RETRY_DELAY_S
        while True:
            began = time.monotonic()
            try:
                # The reporter logs its own failures.
                self._reporter.send(Phase.STARTED, started_at=self._started_at, claimed=True)
            except Exception as exc:
                error = exc
            else:
                self._renewed_at = began  # before ``sent``: unconfirmed() reads them in that order
                self.sent = True
                return None
            wait = min(delay, self.confirm_by - time.time())
            if not _worth_retrying(error) or wait <= 0:
                break
            if self._cancelled.wait(wait):
                return None  # the run ended meanwhile: FINISHED says all there is to say
            delay = min(delay * 2, MAX_RETRY_DELAY_S)
        log.error(
            "Could not send STARTED %.1fs after the invocation began (%s): the task is stopped or not started, "
            "as no executor would know that it runs",
            time.time() - self._started_at,
            protocol.scrub(str(error), 300),
        )
        self._gave_up.set()
        return error


def _worth_retrying(error: Exception) -> bool:
    """False for an answer that will not change (a missing queue, a denied permission): no use trying again."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return True  # no answer at all: a connection or a read that failed
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(response.get("Error", {}).get("Code", ""))
    refused = isinstance(status, int) and 400 <= status < 500 and status != 429
    return not refused or "Throttl" in code


def notice_terms(invoke: InvokeEvent) -> dict[str, float]:
    """What an event asks of its run's notice: no STARTED after ``not_after``; the heartbeat and lease it wants."""
    return {"not_after": invoke.not_after, "heartbeat_s": invoke.heartbeat_s, "lease_s": invoke.lease_s}

"""Whether a run claimed its task: the execution API's answer to the supervisor's ``/run``, seen by the handler.

Two copies of one event (AWS delivers async events at least once; an Invoke whose answer was lost is sent again)
are two runs of one try. The execution API lets one of them take the task: its ``/run``
(``TaskInstanceOperations.start``) succeeds; any other gets 409 Conflict (the task is no longer QUEUED: another
run holds it, or it moved on). The handler must know which, to report STARTED only for a run that holds the task
and ``NOT_CLAIMED`` (never a failure) for one refused. The API knows a run by its hostname, unixname and pid,
which two sandboxes can share: each run's hostname names the run (``run_hostname``), or a second copy would be
let in.

The answer is seen in the process that runs Airflow's supervisor (a child forked from the sandbox, or a new
``execute_workload`` process), and handed to the handler through a small file: the handler makes a private
folder per run and names the file in ``HYBRID_ROUTER_CLAIM_FILE``; ``install_hook`` wraps ``start`` in that
process to write ``claimed`` or ``refused`` to it. A workload command of one's own (a custom image) writes the
same file the same way, or its runs cannot report STARTED and are stopped as unreported.

A third answer: ``stranded``. The execution API gave this run the task, but its supervisor did not start it:
the ``/run`` answer came back unreadable, or was lost and a retry was refused (409) because the lost attempt had
taken the task. Airflow 3.3 answers a retry from the same process 200 (it recognises host and pid), so this
takes a server that does not, or a retry with another identity; the hook then asks a heartbeat with the run's
pid, which only the holder of the task gets through. The run holds the task and never ran it: the handler
reports ``UNREPORTED`` (an infrastructure failure, so the try goes elsewhere without spending a retry), where a
``NOT_CLAIMED`` would leave the task running for nobody until the watchdog gave up on it.

``python -m hybrid_router.lambda_exec.claim --json-path FILE`` is Airflow's ``execute_workload`` with the hook
installed: the handler's command for a workload started as a new process.

Standard library only at import (and the wire messages): the handler imports this module on every cold start.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

from hybrid_router.lambda_exec.protocol import Outcome

CLAIM_FILE_ENV = "HYBRID_ROUTER_CLAIM_FILE"
CLAIMED = "claimed"
REFUSED = "refused"
STRANDED = "stranded"
_STATES = (CLAIMED, REFUSED, STRANDED)


class ClaimFile:
    """The handler's side: a private folder for one run, holding the claim file (and the workload's file when
    it runs as a new process). ``state()`` is ``CLAIMED``, ``REFUSED``, ``STRANDED`` or None (not known yet)."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="hybrid-router-")
        self.path = os.path.join(self.folder, "claim")
        self._state: str | None = None

    def state(self) -> str | None:
        if self._state is None:
            try:
                with open(self.path, encoding="ascii", errors="replace") as handle:
                    text = handle.read().strip()
            except OSError:
                return None
            if text in _STATES:
                self._state = text
        return self._state

    @property
    def claimed(self) -> bool:
        """Whether this run holds the task (``STRANDED`` included: it holds it without running it)."""
        return self.state() in (CLAIMED, STRANDED)

    @property
    def refused(self) -> bool:
        return self.state() == REFUSED

    def verdict(self) -> tuple[Outcome, str] | None:
        """The run's outcome when the answer to its ``/run`` decides it: ``NOT_CLAIMED`` when refused (never a
        failure), ``UNREPORTED`` when stranded; None when the run's own end does."""
        state = self.state()
        if state == REFUSED:
            return Outcome.NOT_CLAIMED, (
                "the execution API refused this run's /run (409): another run holds the task, or it moved on"
            )
        if state == STRANDED:
            return Outcome.UNREPORTED, (
                "the execution API gave this run the task, but the answer to its /run was lost or unreadable "
                "and its supervisor did not start it"
            )
        return None

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def record(state: str, path: str | None = None) -> None:
    """Write ``state`` to the claim file (``path``, or the one named in the environment); the first one stays.

    Written to a new file and renamed into place, so that the handler never reads half of it.
    """
    if state not in _STATES:
        raise ValueError(f"unknown claim state {state!r}")
    path = path or os.environ.get(CLAIM_FILE_ENV)
    if not path or os.path.exists(path):
        return
    partial = f"{path}.{os.getpid()}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(state)
    os.replace(partial, path)


def install_hook(path: str | None = None) -> None:
    """Record the execution API's answer to ``/run`` in this process: ``claimed`` on 2xx, ``refused`` on 409
    Conflict, ``stranded`` when the server took the task but ``start`` failed all the same (see the module's
    docstring); another answer, or none, records nothing (the run did not learn that it holds the task, and
    fails as before). Imports Airflow's API client.

    ``TaskInstanceOperations.start`` (the supervisor's ``/run``) is wrapped to put a response hook in front of its
    client's own (which raises on 4xx/5xx): the hook sees the status itself, so a 2xx whose body cannot be read
    still counts as the claim it is. A 2xx is then confirmed by a heartbeat with the same pid, which the API
    refuses (409, "running elsewhere") if another run's ``/run`` took the task after ours: on SQLite (no row
    locks) two ``/run`` that read QUEUED at once both succeed, the later one holding the task. A claim so lost
    is ``refused``, and ``start`` raises as for a 409, so the supervisor stops before its task starts.
    """
    path = path or os.environ.get(CLAIM_FILE_ENV)
    if not path:
        return
    from airflow.sdk.api.client import TaskInstanceOperations

    original = TaskInstanceOperations.start
    original = getattr(original, "_records_claim", original)  # installed before: wrap the original once
    attempts: list[int] = []  # one per /run request sent (the client retries a lost answer)
    answers: list[int] = []  # the statuses of /run answers

    def is_run(request: Any) -> bool:
        return request.method == "PATCH" and request.url.path.endswith("/run")

    def on_request(request: Any) -> None:
        if is_run(request):
            attempts.append(1)

    def on_response(response: Any) -> None:
        if is_run(response.request):
            answers.append(response.status_code)

    def start(self: Any, id: Any, pid: int, *args: Any, **kwargs: Any) -> Any:
        hooks = self.client.event_hooks
        if on_response not in hooks["response"]:
            hooks["response"] = [on_response, *hooks["response"]]
            hooks["request"] = [on_request, *hooks["request"]]
            self.client.event_hooks = hooks
        attempts.clear()
        answers.clear()
        try:
            context = original(self, id, pid, *args, **kwargs)
        except Exception:
            held = _held_after_failed_start(self, id, pid, answers, len(attempts))
            if held is not None:
                record(held, path)
            raise
        try:
            self.heartbeat(id, pid=pid)
        except Exception as exc:
            if getattr(getattr(exc, "response", None), "status_code", None) == 409:
                record(REFUSED, path)
                raise
        record(CLAIMED, path)
        return context

    start._records_claim = original  # type: ignore[attr-defined]
    TaskInstanceOperations.start = start  # type: ignore[method-assign]


def _held_after_failed_start(
    operations: Any, id: Any, pid: int, answers: list[int], attempts: int
) -> str | None:
    """What a ``/run`` call that raised leaves this run with: ``STRANDED`` when the server gave it the task,
    ``REFUSED`` when it did not, None when that cannot be known."""
    if any(200 <= status < 300 for status in answers):
        return STRANDED
    refused = bool(answers) and answers[-1] == 409
    # An attempt with no answer, or a 5xx, may have taken the task: then the retry's 409 is about this run.
    lost = attempts > len(answers) or any(status >= 500 for status in answers)
    if not lost:
        return REFUSED if refused else None
    # The API lets a heartbeat with this pid through only for the process that holds the task.
    try:
        operations.heartbeat(id, pid=pid)
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return REFUSED if refused or status == 409 else None
    return STRANDED


def main(argv: list[str] | None = None) -> None:
    """``execute_workload``'s entry point, with the claim hook installed first."""
    install_hook()
    from airflow.sdk.execution_time import execute_workload

    sys.argv = [execute_workload.__file__, *(sys.argv[1:] if argv is None else argv)]
    execute_workload.main()


if __name__ == "__main__":
    main()

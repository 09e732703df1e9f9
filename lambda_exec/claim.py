"""Whether a run claimed its task: the execution API's answer to the supervisor's ``/run``, seen by the handler.

Two copies of one event (AWS delivers async events at least once; an Invoke whose answer was lost is sent again)
are two runs of one try. The execution API lets one of them take the task: its ``/run``
(``TaskInstanceOperations.start``) succeeds; any other gets 409 Conflict (the task is no longer QUEUED: another
run holds it, or it moved on). The handler must know which, to report STARTED only for a run that holds the task
and ``NOT_CLAIMED`` (never a failure) for one refused.

The answer is seen in the process that runs Airflow's supervisor (a child forked from the sandbox, or a new
``execute_workload`` process), and handed to the handler through a small file: the handler makes a private
folder per run and names the file in ``HYBRID_ROUTER_CLAIM_FILE``; ``install_hook`` wraps ``start`` in that
process to write ``claimed`` or ``refused`` to it. A workload command of one's own (a custom image) writes the
same file the same way, or its runs cannot report STARTED and are stopped as unreported.

``python -m hybrid_router.lambda_exec.claim --json-path FILE`` is Airflow's ``execute_workload`` with the hook
installed: the handler's command for a workload started as a new process.

Standard library only at import: the handler imports this module on every cold start.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

CLAIM_FILE_ENV = "HYBRID_ROUTER_CLAIM_FILE"
CLAIMED = "claimed"
REFUSED = "refused"
_STATES = (CLAIMED, REFUSED)


class ClaimFile:
    """The handler's side: a private folder for one run, holding the claim file (and the workload's file when
    it runs as a new process). ``state()`` is ``CLAIMED``, ``REFUSED`` or None (not known yet)."""

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
        return self.state() == CLAIMED

    @property
    def refused(self) -> bool:
        return self.state() == REFUSED

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
    Conflict; another answer, or none, records nothing (the run did not learn that it holds the task, and fails
    as before). Imports Airflow's API client.

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
    answers: list[int] = []  # the statuses of /run answers

    def on_response(response: Any) -> None:
        request = response.request
        if request.method == "PATCH" and request.url.path.endswith("/run"):
            answers.append(response.status_code)
            if response.status_code == 409:
                record(REFUSED, path)

    def start(self: Any, id: Any, pid: int, *args: Any, **kwargs: Any) -> Any:
        hooks = self.client.event_hooks
        if on_response not in hooks["response"]:
            hooks["response"] = [on_response, *hooks["response"]]
            self.client.event_hooks = hooks
        answers.clear()
        try:
            context = original(self, id, pid, *args, **kwargs)
        except Exception:
            if answers and 200 <= answers[-1] < 300:
                record(CLAIMED, path)
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


def main(argv: list[str] | None = None) -> None:
    """``execute_workload``'s entry point, with the claim hook installed first."""
    install_hook()
    from airflow.sdk.execution_time import execute_workload

    sys.argv = [execute_workload.__file__, *(sys.argv[1:] if argv is None else argv)]
    execute_workload.main()


if __name__ == "__main__":
    main()

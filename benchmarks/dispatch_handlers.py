"""The API-only Lambda handlers of ``scheduler_dispatch.py``; this folder is their functions' ``code_path``.

Both make the task runner's execution-API calls and nothing else: claim the task instance (``/run``, with the
workload's token), wait the task's duration without using the CPU, then report it succeeded (``/state``). They
differ only in how each tells its executor, in that executor's own format:

- ``provider_api_only``: the Amazon provider's ``{task_key, return_code}`` to ``QUEUE_URL``, as its
  ``docker/app.py`` sends it;
- ``hybrid_api_only``: this project's signed messages, as its real handler sends them (STARTED held back for the
  grace and only once claimed, then FINISHED; ``NOT_CLAIMED`` when ``/run`` is refused).

So the sandboxes spend next to no CPU, and a run measures the executors, SQS and the execution API rather than
Airflow's task runner. Standard library and boto3 only, as a lean handler would be.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

TASK_SECONDS_ENV = "DISPATCH_TASK_SECONDS"
# The execution API version Airflow's task SDK speaks (airflow.sdk.api.datamodels._generated.API_VERSION).
API_VERSION = "2026-06-30"


def claim_and_succeed(workload_json: str, on_claim: Callable[[bool], None] | None = None) -> bool:
    """Claim the workload's task instance, wait ``DISPATCH_TASK_SECONDS``, report success; False if refused."""
    workload = json.loads(workload_json)
    ti_id, token = workload["ti"]["id"], workload["token"]
    base = os.environ["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].rstrip("/")
    claim = {
        "state": "running",
        "hostname": socket.gethostname(),
        "unixname": getpass.getuser(),
        "pid": os.getpid(),
        "start_date": _now(),
    }
    try:
        refreshed = _patch(f"{base}/task-instances/{ti_id}/run", token, claim)
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise
        if on_claim:
            on_claim(False)
        return False
    if on_claim:
        on_claim(True)
    # The workload's token may only claim; the answer to /run carries the one that runs the task.
    token = refreshed or token
    time.sleep(float(os.environ.get(TASK_SECONDS_ENV, "1")))
    _patch(f"{base}/task-instances/{ti_id}/state", token, {"state": "success", "end_date": _now()})
    return True


def provider_api_only(event: Any, context: Any) -> dict[str, Any]:
    """The provider's event: the workload is the last word of its ``execute_workload --json-string`` command."""
    from hybrid_router.lambda_exec.handler import this_sandbox

    return_code = 0 if claim_and_succeed(event["command"][-1]) else 1
    body = json.dumps({"task_key": event["task_key"], "return_code": return_code})
    this_sandbox().sqs_client().send_message(QueueUrl=os.environ["QUEUE_URL"], MessageBody=body)
    return {"return_code": return_code}


def hybrid_api_only(event: Any, context: Any) -> dict[str, Any]:
    """This project's event and result messages, as ``handler.handle`` sends them for a run of this length."""
    from hybrid_router.lambda_exec import handler, protocol
    from hybrid_router.lambda_exec.claim import CLAIMED, REFUSED
    from hybrid_router.lambda_exec.protocol import Outcome, Phase

    sandbox = handler.this_sandbox()
    invoke = protocol.read_event(event)
    reporter = handler.ResultReporter(invoke, context, invoke.result_signing_key(), sandbox.sqs_client)
    started = time.time()
    claim: list[str] = []
    notice = handler.StartedNotice(
        reporter,
        started,
        sandbox.settings.started_grace_s,
        not_after=invoke.not_after,
        claim=lambda: claim[0] if claim else None,
    )
    notice.arm()
    try:
        claimed = claim_and_succeed(invoke.workload, lambda ok: claim.append(CLAIMED if ok else REFUSED))
    finally:
        notice.settle()
    reporter.send(
        Phase.FINISHED,
        started_at=started,
        outcome=Outcome.SUCCESS if claimed else Outcome.NOT_CLAIMED,
        return_code=0 if claimed else None,
        claimed=claimed,
    )
    return {"status": "success" if claimed else "not_claimed"}


def _patch(url: str, token: str, body: dict[str, Any]) -> str | None:
    """The call; the token the answer hands over for the next calls, if any."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PATCH")
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    request.add_header("Airflow-API-Version", API_VERSION)
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
        return response.headers.get("Refreshed-API-Token")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()

"""No-op Lambda handlers for ``lambda_dispatch.py``; this folder is the benchmark functions' ``code_path``.

Each answers in its executor's own message format, without running any task.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


def hybrid_noop(event: Any, context: Any) -> dict[str, Any]:
    """This project's protocol, as the real handler sends it: a STARTED held back for the handler's grace
    (``StartedNotice``, so a no-op sends none) and a signed FINISHED(SUCCESS)."""
    from hybrid_router.lambda_exec import handler, protocol
    from hybrid_router.lambda_exec.protocol import Outcome, Phase

    sandbox = handler.this_sandbox()  # the settings and the SQS client, kept between invocations
    invoke = protocol.read_event(event)
    reporter = handler.ResultReporter(invoke, context, invoke.result_signing_key(), sandbox.sqs_client)
    started = time.time()
    notice = handler.StartedNotice(reporter, started, sandbox.settings.started_grace_s)
    notice.arm()
    notice.settle()  # the no-op workload ends here
    reporter.send(Phase.FINISHED, started_at=started, outcome=Outcome.SUCCESS, return_code=0)
    return {"status": "success"}


def provider_noop(event: Any, context: Any) -> dict[str, Any]:
    """The Amazon provider's protocol (its docker/app.py): ``{task_key, return_code}`` to ``QUEUE_URL``."""
    from hybrid_router.lambda_exec.handler import this_sandbox

    body = json.dumps({"task_key": event["task_key"], "return_code": 0})
    this_sandbox().sqs_client().send_message(QueueUrl=os.environ["QUEUE_URL"], MessageBody=body)
    return {"return_code": 0}

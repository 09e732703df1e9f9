"""Functions the local Lambda service runs in the LambdaExecutor's integration tests and benchmark.

This folder is the functions' ``code_path``. ``fake_workload`` is the project's real handler (signed events,
STARTED/FINISHED results, deadline watch) with Airflow's task runner replaced by a small script whose
behaviour the task id chooses, so that no Airflow API server is needed:

- ``ok*``: exits 0 at once; ``fail*``: exits 1 (the task's own failure);
- ``sleep*``: sleeps far past any function timeout; ``hog*``: touches memory until the service kills it.
"""

from __future__ import annotations

import sys
from typing import Any

_SCRIPT = """
import json, sys, time
workload = json.load(open(sys.argv[1]))
task_id = workload["ti"]["task_id"]
print("fake task", task_id, "running", flush=True)
if task_id.startswith("fail"):
    sys.exit(1)
if task_id.startswith("sleep"):
    time.sleep(600)
if task_id.startswith("hog"):
    chunks = []
    while True:
        chunks.append(b"x" * (16 * 1024 * 1024))
        time.sleep(0.01)
sys.exit(0)
"""


def fake_workload(event: Any, context: Any) -> Any:
    from hybrid_router.lambda_exec import handler

    handler.build_workload_command = lambda path: [sys.executable, "-c", _SCRIPT, path]
    return handler.handler(event, context)

"""Handlers the local Lambda service runs in tests: this folder is the functions' ``code_path``, for the service's
own tests and for the LambdaExecutor's integration tests (tests/lambda_exec/test_integration.py)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from typing import Any

# Stands in for Airflow's ``execute_workload --json-path FILE``; what it does is chosen by the workload. For an
# Airflow workload, by its task id: ``fail*`` exits 1 (the task's own failure), ``sleep*`` sleeps far past any
# function timeout, ``hog*`` touches memory until the service kills it, any other exits 0 at once. A bare
# ``{"exit": N}`` (the service's tests) exits N; ``{"forge": {...}}`` is a hostile task (``_FORGING_TASK``).
# Like Airflow's supervisor under the handler's claim hook, it first records that its /run claimed the task.
_FAKE_WORKLOAD = """
import json, os, sys, time
workload = json.load(open(sys.argv[1]))
if os.environ.get("HYBRID_ROUTER_CLAIM_FILE"):
    with open(os.environ["HYBRID_ROUTER_CLAIM_FILE"], "w") as claim:
        claim.write("claimed")
if "forge" in workload:
    exec(FORGING_TASK)
if "ti" not in workload:
    print("fake task ran", flush=True)
    sys.exit(workload["exit"])
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

# A task that signs a successful FINISHED for ANOTHER dispatch with every key within its reach: each value of its
# environment and of its parent's initial one (where a secret set on the function would stay readable), each key
# the protocol would derive from those for that dispatch, and its own dispatch's result key, which the spec gives
# it as if read from the sandbox's memory. It writes the bodies it made, and one for its own dispatch.
_FORGING_TASK = """
from dataclasses import replace
from hybrid_router.lambda_exec import protocol
spec = workload["forge"]
values = set(os.environ.values())
try:
    with open(f"/proc/{os.getppid()}/environ", "rb") as parent:
        values.update(v.partition(b"=")[2].decode("utf-8", "replace") for v in parent.read().split(b"\\0"))
except OSError:
    pass
found = [value.strip().encode() for value in values if value.strip()] + [bytes.fromhex(spec["own_key"])]
derive = getattr(protocol, "result_key", None)
keys = found + ([derive(key, spec["dispatch_id"]) for key in found] if derive else [])
now = time.time()
message = protocol.ResultMessage(
    phase=protocol.Phase.FINISHED, dispatch_id=spec["dispatch_id"], task=protocol.TaskRef(**spec["task"]),
    sent_at=now, started_at=now, outcome=protocol.Outcome.SUCCESS, return_code=0,
)
own = replace(message, dispatch_id=spec["own_dispatch_id"])
with open(spec["out"], "w") as out:
    json.dump({
        "forged": [protocol.seal_result(message, key) for key in keys],
        "own": protocol.seal_result(own, bytes.fromhex(spec["own_key"])),
        "environ": dict(os.environ),
    }, out)
sys.exit(0)
"""


def noop(event: Any, context: Any) -> dict[str, Any]:
    return {"ok": True}


def describe(event: Any, context: Any) -> dict[str, Any]:
    """Echo the event and what the runtime offers, so tests can check both."""
    print("describe called", flush=True)
    return {
        "event": event,
        "request_id": context.aws_request_id,
        "function_name": context.function_name,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "log_stream_name": context.log_stream_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "env_marker": os.environ.get("FIXTURE_MARKER", ""),
    }


def record(event: Any, context: Any) -> dict[str, Any]:
    """Append one line per run to the file the event names (counts runs, retries and duplicates)."""
    started = time.time()
    if event.get("fail"):
        _append(event["record_file"], context, started)
        raise RuntimeError(event["fail"])
    time.sleep(event.get("sleep", 0))
    _append(event["record_file"], context, started)
    return {"ok": True}


def _append(path: str, context: Any, started: float) -> None:
    line = {"request_id": context.aws_request_id, "pid": os.getpid(), "start": started, "end": time.time()}
    with open(path, "a") as out:
        out.write(json.dumps(line) + "\n")


def real_handler_with_fake_workload(event: Any, context: Any) -> Any:
    """The project's handler (signed events, STARTED/FINISHED results, deadline watch) in a sandbox whose
    workloads run ``_FAKE_WORKLOAD`` instead of Airflow's task runner, so that no Airflow API server is needed."""
    from hybrid_router.lambda_exec.handler import handle

    return handle(event, context, _fake_workload_sandbox())


@functools.cache
def _fake_workload_sandbox() -> Any:
    from hybrid_router.lambda_exec.handler import Sandbox

    script = f"FORGING_TASK = {_FORGING_TASK!r}\n{_FAKE_WORKLOAD}"
    return Sandbox(workload_command=lambda path: [sys.executable, "-c", script, path])


def sleep_with_child(event: Any, context: Any) -> None:
    """Sleep past any timeout, with a grandchild in another session that must die with the sandbox."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    with open(event["pid_file"], "w") as out:
        json.dump({"sandbox": os.getpid(), "child": child.pid}, out)
    time.sleep(event.get("seconds", 300))


def hog(event: Any, context: Any) -> None:
    """Touch memory in 16 MB steps, up to the event's ``mb``: what a task that needs too much does."""
    with open(event["pid_file"], "w") as out:
        json.dump({"sandbox": os.getpid()}, out)
    chunks = []
    for _ in range(event["mb"] // 16):
        chunks.append(b"x" * (16 * 1024 * 1024))
        time.sleep(0.02)
    time.sleep(5)


def fork_sharing_memory(event: Any, context: Any) -> dict[str, Any]:
    """Touch ``mb`` MB, then fork a child that shares those pages (as Airflow's supervisor and task runner do)."""
    buffer = b"x" * (event["mb"] * 1024 * 1024)
    pid = os.fork()
    if pid == 0:
        time.sleep(event["seconds"])
        os._exit(0)
    time.sleep(event["seconds"])
    os.waitpid(pid, 0)
    return {"bytes": len(buffer)}


def fail(event: Any, context: Any) -> None:
    raise ValueError("the handler failed on purpose")


def exit_runtime(event: Any, context: Any) -> None:
    os._exit(3)

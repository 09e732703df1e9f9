"""What the in-Lambda handler's tests share: a fake context, a fake workload, signed events, the results sent."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from hybrid_router.lambda_exec import claim, protocol
from hybrid_router.lambda_exec.handler import Sandbox, handle
from hybrid_router.lambda_exec.protocol import InvokeEvent, Outcome, Phase, TaskRef

if TYPE_CHECKING:
    from moto_sqs import Moto

# The executor's secret: it seals the events; the function never holds it.
SECRET = "handler-test-secret"
FAKE_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0aSJ9.c2lnbmF0dXJl"

# Stands in for `python -m airflow.sdk.execution_time.execute_workload --json-path FILE`: reads the workload
# file like the real one and acts on it. Like Airflow's supervisor with its task runner, it can start a
# grandchild in a process group of its own, to prove the handler kills the whole tree, not just one group.
# Like Airflow's supervisor with the claim hook, it records the execution API's answer to its /run in the claim
# file the handler names: `claim` in the spec is that answer ("claimed" by default; "refused" is a 409, after
# which the supervisor exits 1; "none": the answer never comes), given after `claim_after` seconds.
# It holds `alloc_mb` megabytes while it sleeps `sleep` seconds.
FAKE_WORKLOAD = r"""
import json, os, subprocess, sys, time
path = sys.argv[1]
spec = json.loads(open(path).read())
claim, claim_file = spec.get("claim", "claimed"), os.environ.get("HYBRID_ROUTER_CLAIM_FILE")
time.sleep(spec.get("claim_after", 0))
if claim_file and claim != "none":
    with open(claim_file + ".tmp", "w") as out:
        out.write(claim)
    os.replace(claim_file + ".tmp", claim_file)
if claim == "refused":
    print("Conflict: task instance is not queued", flush=True)
    sys.exit(1)
record = spec.get("record")
if record:
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    with open(record, "w") as out:
        json.dump({"pid": os.getpid(), "grandchild": grandchild.pid, "argv": sys.argv, "environ": dict(os.environ)}, out)
print("workload output line", spec.get("token", ""), flush=True)
ballast = b"x" * (spec.get("alloc_mb", 0) * 1024 * 1024)
time.sleep(spec.get("sleep", 0))
sys.exit(spec.get("exit", 0))
"""


class FakeCommand:
    """A sandbox's ``workload_command`` that runs ``FAKE_WORKLOAD`` and records each command it builds."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, path: str) -> list[str]:
        command = [sys.executable, "-c", FAKE_WORKLOAD, path]
        self.calls.append(command)
        return command


def make_sandbox(settings: Mapping[str, str] | None = None, **fields: Any) -> Sandbox:
    """A sandbox of the test's own: ``settings`` are its whole environment (the function needs no secret)."""
    return Sandbox(environ=dict(settings or {}), **fields)


class FakeContext:
    def __init__(self, timeout_s: float, request_id: str = "req-1"):
        self.aws_request_id = request_id
        self.function_name = "airflow-task"
        self.memory_limit_in_mb = 1024
        self.log_stream_name = "2026/11/24/[$LATEST]abcdef"
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def make_event(queue_url: str, spec: dict[str, Any], not_after_in: float = 600.0) -> InvokeEvent:
    now = time.time()
    return InvokeEvent(
        dispatch_id=uuid.uuid4().hex,
        task=TaskRef("dag", "task", "run-1", 1),
        workload=json.dumps(spec),
        results_queue_url=queue_url,
        issued_at=now,
        not_after=now + not_after_in,
    )


def sealed(event: InvokeEvent) -> dict[str, Any]:
    # Lambda's runtime hands the handler the parsed JSON payload: the envelope as a dict.
    return json.loads(protocol.seal_event(event, SECRET.encode()))


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def results(moto: Moto, queue_url: str, expected: int) -> list[protocol.ResultMessage]:
    messages = moto.receive_all(queue_url, expected, timeout=10)
    return [protocol.open_result(m["Body"], SECRET.encode()) for m in messages]


def until_finished(moto: Moto, queue_url: str, timeout: float = 10.0) -> list[protocol.ResultMessage]:
    """The results of one run, in the order sent, up to its FINISHED (a short run sends FINISHED alone)."""
    received: list[protocol.ResultMessage] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(r.phase is Phase.FINISHED for r in received):
        for message in moto.receive_all(queue_url, 1, timeout=2):
            received.append(protocol.open_result(message["Body"], SECRET.encode()))
    return sorted(received, key=lambda r: (r.sent_at, r.phase is Phase.FINISHED))


def run_past_the_deadline(
    sandbox: Sandbox, event: InvokeEvent, record: Path, moto: Moto, results_queue: str
) -> protocol.ResultMessage:
    """Run a 60 s task with 3 s left and a 1.5 s margin; check the handler stopped its whole tree in time."""
    begin = time.monotonic()
    answer = handle(sealed(event), FakeContext(3.0), sandbox)
    elapsed = time.monotonic() - begin

    assert answer["status"] == "timeout"
    # Stopped at remaining <= 1.5 s, i.e. ~1.5 s in, plus at most the 1 s SIGTERM grace.
    assert elapsed < 3.0
    # The run outlasted the STARTED grace: STARTED went out while it ran, then the TIMEOUT.
    started, finished = until_finished(moto, results_queue)
    assert started.phase is Phase.STARTED
    assert finished.outcome is Outcome.TIMEOUT
    # A run stopped at the deadline is billed all the same, for the time up to its report.
    assert finished.usage is not None and finished.usage.billed_duration_ms >= 1000
    pids = json.loads(record.read_text())
    assert wait_gone(pids["pid"]) and wait_gone(pids["grandchild"])
    return finished


# Airflow's supervisor and task process, reduced to what a deadline stop meets: the supervisor forks the task
# into a process group of its own, forwards SIGTERM to it, relays its log lines and reports the final state the
# task sends it (here: appends it to the `reported` file, standing in for the execution API). The task's SIGTERM
# handler is Airflow's task runner calling on_kill, which, like BashOperator's, logs before it acts; then the
# task sends FAILED and waits for the supervisor's answer, as Airflow's task runner does.
SUPERVISED_WORKLOAD = r"""
import json, os, signal, socket, sys, time

def supervise(spec):
    ours, theirs = socket.socketpair()
    task = os.fork()
    if task == 0:
        os.setpgid(0, 0)
        ours.close()

        def on_kill(signum, frame):
            theirs.sendall(b"log: Sending SIGTERM signal to process group\n")
            with open(spec["on_kill"], "w") as out:
                out.write("on_kill ran")
            theirs.sendall(b"state: failed\n")
            theirs.recv(1)
            os._exit(1)

        signal.signal(signal.SIGTERM, on_kill)
        with open(spec["record"], "w") as out:
            json.dump({"pid": os.getppid(), "task": os.getpid()}, out)
        while True:
            time.sleep(0.05)
    theirs.close()
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(task, signum))
    received = b""
    while b"state: " not in received:
        chunk = ours.recv(4096)
        if not chunk:
            break
        received += chunk
    state = received.split(b"state: ", 1)[1].split()[0].decode() if b"state: " in received else "failed"
    with open(spec["reported"], "a") as out:
        out.write(state + "\n")
    os.waitpid(task, 0)
    return 1
"""


def fake_claim(spec: dict[str, Any]) -> int | None:
    """In a fake runner in the forked child: the /run answer ``FAKE_WORKLOAD`` gives; the exit code if refused."""
    time.sleep(spec.get("claim_after", 0))
    answer = spec.get("claim", "claimed")
    if answer != "none":
        claim.record(answer)
    return 1 if answer == "refused" else None


class SupervisedRunner:
    """Runs ``SUPERVISED_WORKLOAD`` in the handler's forked child, as Airflow's task runner would run there."""

    def run(self, workload_json: str) -> int:
        refused = fake_claim(json.loads(workload_json))
        if refused is not None:
            return refused
        namespace: dict[str, Any] = {}
        exec(SUPERVISED_WORKLOAD, namespace)
        return namespace["supervise"](json.loads(workload_json))


def supervised_command(path: str) -> list[str]:
    """A sandbox's ``workload_command`` running ``SUPERVISED_WORKLOAD`` as a new process."""
    main = (
        "\nclaim_file = os.environ.get('HYBRID_ROUTER_CLAIM_FILE')\n"
        "if claim_file:\n    open(claim_file, 'w').write('claimed')\n"
        "sys.exit(supervise(json.load(open(sys.argv[1]))))\n"
    )
    return [sys.executable, "-c", SUPERVISED_WORKLOAD + main, path]

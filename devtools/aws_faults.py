"""AWS-like latency and failures for every SQS client of a process, through botocore's own event hooks.

The product's code is untouched: ``install()`` registers handlers on a botocore session's events, so each
client created from it afterwards (boto3's, the Amazon provider's hooks') gets them:

- ``before-send.sqs``: each SQS call waits a log-normal latency (median 8 ms, p99 3x by default) before it goes
  out, as a call to SQS in the same region would;
- ``before-call.sqs.SendMessage``: a share of sends fail as their caller sees them (after botocore's own
  retries): a 500 ``InternalError`` answer, the message not sent;
- ``before-call.sqs.ReceiveMessage``: receives fail during an outage of ``outage_s`` every ``outage_every_s``
  (the same wall-clock windows in every process, from ``epoch``).

Other processes (Airflow's scheduler, the local Lambda service's sandboxes) take the same settings from the
``HYBRID_ROUTER_AWS_FAULTS`` environment variable (JSON), read by ``devtools/aws_faults_site/sitecustomize.py``
when that folder and the checkout are on ``PYTHONPATH``: see ``process_env()``. Every injected failure is
appended to the JSON-lines file ``log_file`` (one per run, shared by all processes) so a benchmark counts them.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ENV = "HYBRID_ROUTER_AWS_FAULTS"
SITE_DIR = Path(__file__).with_name("aws_faults_site")
REPO_ROOT = Path(__file__).resolve().parent.parent
_Z99 = 2.3263478740408408


@dataclass(frozen=True)
class SqsFaults:
    latency_median_ms: float | None = None  # None: no added latency
    latency_p99_factor: float = 3.0
    send_failure_rate: float = 0.0
    outage_every_s: float | None = None  # None: receives never fail
    outage_s: float = 5.0
    epoch: float = field(default_factory=time.time)
    log_file: str | None = None
    seed: int | None = None

    @classmethod
    def aws_like(cls, **changes: Any) -> SqsFaults:
        """The honest-speed latency model alone: 8 ms median per SQS call, p99 three times that."""
        return cls(latency_median_ms=8.0, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SqsFaults:
        return cls(**json.loads(text))

    def in_outage(self, now: float) -> bool:
        if not self.outage_every_s:
            return False
        return (now - self.epoch) % self.outage_every_s >= self.outage_every_s - self.outage_s


class _Injector:
    def __init__(self, faults: SqsFaults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed if faults.seed is None else faults.seed + os.getpid())
        self._lock = threading.Lock()

    def delay(self, **_: Any) -> None:
        median = self.faults.latency_median_ms
        if median:
            sigma = math.log(self.faults.latency_p99_factor) / _Z99
            with self._lock:
                seconds = self._rng.lognormvariate(math.log(median / 1000.0), sigma)
            time.sleep(seconds)

    def fail_send(self, **_: Any) -> tuple[Any, dict[str, Any]] | None:
        with self._lock:
            failing = self.faults.send_failure_rate and self._rng.random() < self.faults.send_failure_rate
        if not failing:
            return None
        self._record("send_failed")
        return _error_response(500, "InternalError", "We encountered an internal error. Please try again.")

    def fail_receive(self, **_: Any) -> tuple[Any, dict[str, Any]] | None:
        if not self.faults.in_outage(time.time()):
            return None
        self._record("receive_failed")
        return _error_response(503, "ServiceUnavailable", "Service is unable to handle request.")

    def _record(self, what: str) -> None:
        if self.faults.log_file:
            line = json.dumps({"event": what, "pid": os.getpid(), "at": time.time()})
            with open(self.faults.log_file, "a", encoding="utf-8") as out:
                out.write(line + "\n")


class _Answer:
    """What botocore needs of an HTTP answer that a ``before-call`` handler returns instead of calling AWS."""

    def __init__(self, status: int) -> None:
        self.status_code = status
        self.headers: dict[str, str] = {}
        self.content = b""


def _error_response(status: int, code: str, message: str) -> tuple[Any, dict[str, Any]]:
    parsed = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}, "RetryAttempts": 0},
    }
    return _Answer(status), parsed


def install(events: Any, faults: SqsFaults) -> None:
    """Register the handlers on a botocore event emitter (a session's or a client's ``meta.events``)."""
    injector = _Injector(faults)
    events.register("before-send.sqs", injector.delay)
    events.register("before-call.sqs.SendMessage", injector.fail_send)
    events.register("before-call.sqs.ReceiveMessage", injector.fail_receive)


def install_in_every_session(faults: SqsFaults) -> None:
    """Every botocore session this process creates from now on gets the handlers (sitecustomize's job)."""
    import botocore.session

    original = botocore.session.Session.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        install(self.get_component("event_emitter"), faults)

    botocore.session.Session.__init__ = init  # type: ignore[method-assign]


def process_env(faults: SqsFaults, base_pythonpath: str | None = None) -> dict[str, str]:
    """The environment that gives another Python process (and its children) the same SQS faults."""
    paths = [str(SITE_DIR), str(REPO_ROOT), *filter(None, [base_pythonpath])]
    return {ENV: faults.to_json(), "PYTHONPATH": os.pathsep.join(paths)}


def injected(log_file: str | Path) -> dict[str, int]:
    """How many failures every process injected, by kind, from the shared log."""
    counts: dict[str, int] = {}
    path = Path(log_file)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            event = json.loads(line)["event"]
            counts[event] = counts.get(event, 0) + 1
    return counts

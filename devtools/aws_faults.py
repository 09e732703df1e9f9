"""AWS-like latency and failures for every SQS and Lambda client of a process, through botocore's own event hooks.

The product's code is untouched: ``install()`` registers handlers on a botocore session's events, so each
client created from it afterwards (boto3's, the Amazon provider's hooks') gets them:

- ``before-send.sqs``: each SQS call waits a log-normal latency (median 8 ms, p99 3x by default) before it goes
  out, as a call to SQS in the same region would; except ``ReceiveMessage``, which waits it after its answer
  (``after-call``), and only when that answer holds messages or the receive was a short poll: an empty long
  poll is all wait (``WaitTimeSeconds``), and a round trip on top of it would only slow a reader's next poll,
  while a long poll that messages end pays the round trip that brings them. A queue's own
  ``ReceiveMessageWaitTimeSeconds`` is not looked up: a receive without ``WaitTimeSeconds`` counts as short;
- ``calls_log``: every AWS call (of any service, injected failures included) is appended to this JSON-lines file
  with its operation and process id, so a benchmark counts one process's calls (see ``calls()``);
- ``before-call``: instead of calling AWS, a call fails as its caller sees it (after botocore's own retries):
  - every Lambda and SQS call while the credentials are expired (``credentials_expired_at`` for
    ``credentials_expired_s``): a 403 ``ExpiredTokenException`` (Lambda) or ``ExpiredToken`` (SQS), as AWS
    answers a request signed with an expired session token;
  - a share of SQS sends (``send_failure_rate``): a 500 ``InternalError`` answer, the message not sent;
- ``send_delay_s``: each SQS send waits that much longer before it goes out (a run whose reports come late);
  - SQS receives during an outage: ``outage_s`` every ``outage_every_s`` (the same wall-clock windows in every
    process, from ``epoch``), and one outage of ``outage_s`` from ``outage_at``: a 503 ``ServiceUnavailable``.

Other processes (Airflow's scheduler, the local Lambda service's sandboxes) take the same settings from the
environment, read by ``devtools/aws_faults_site/sitecustomize.py`` when that folder and the checkout are on
``PYTHONPATH`` (see ``process_env()``): either fixed for the process's life (``HYBRID_ROUTER_AWS_FAULTS``, JSON)
or from a ``FaultsFile`` (``HYBRID_ROUTER_AWS_FAULTS_FILE``, its path), which every call checks again, so that a
test can go through several faults in turn on one running stack. Every injected failure is appended to the
JSON-lines file ``log_file`` (one per run, shared by all processes) so a test or a benchmark counts them.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ENV = "HYBRID_ROUTER_AWS_FAULTS"
FILE_ENV = "HYBRID_ROUTER_AWS_FAULTS_FILE"
SITE_DIR = Path(__file__).with_name("aws_faults_site")
REPO_ROOT = Path(__file__).resolve().parent.parent
_Z99 = 2.3263478740408408
# The services whose calls an expired session token refuses (the ones the executor and the handler call).
_SIGNED_SERVICES = ("lambda", "sqs")
_EXPIRED_TOKEN_CODES = {"lambda": "ExpiredTokenException", "sqs": "ExpiredToken"}
# Set in a call's botocore context: whether a ReceiveMessage long-polls.
_LONG_POLL = "hybrid_router_long_poll"


@dataclass(frozen=True)
class SqsFaults:
    latency_median_ms: float | None = None  # None: no added latency
    latency_p99_factor: float = 3.0
    send_failure_rate: float = 0.0
    send_delay_s: float = 0.0  # every SQS send waits this much more before it goes out
    outage_every_s: float | None = None  # None: no periodic receive outage
    outage_s: float = 5.0
    epoch: float = field(default_factory=time.time)
    outage_at: float | None = None  # wall-clock start of one more receive outage of outage_s
    credentials_expired_at: float | None = None  # wall-clock start of a window of expired credentials
    credentials_expired_s: float = 0.0
    log_file: str | None = None
    calls_log: str | None = None  # None: calls are not counted
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
        if self.outage_at is not None and self.outage_at <= now < self.outage_at + self.outage_s:
            return True
        if not self.outage_every_s:
            return False
        return (now - self.epoch) % self.outage_every_s >= self.outage_every_s - self.outage_s

    def credentials_expired(self, now: float) -> bool:
        start = self.credentials_expired_at
        return start is not None and start <= now < start + self.credentials_expired_s


class FaultsFile:
    """Settings in a JSON file that the processes reading it (``process_env(faults_file)``) check at every call:
    ``write`` replaces them while those processes run. No file, or one that cannot be read: no faults."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._faults = SqsFaults()

    def write(self, faults: SqsFaults) -> None:
        # A rename is atomic: a reader sees the old settings or the new ones, never half a file.
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(faults.to_json(), encoding="utf-8")
        os.replace(partial, self.path)

    def current(self) -> SqsFaults:
        try:
            stat = os.stat(self.path)
        except OSError:
            return SqsFaults()
        # Each write is a new file (a new inode): a change is seen even within the clock's resolution.
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if seen != self._seen:
                try:
                    self._faults = SqsFaults.from_json(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError, TypeError):
                    self._faults = SqsFaults()
                self._seen = seen
            return self._faults


class _Injector:
    def __init__(self, source: Callable[[], SqsFaults]) -> None:
        self._source = source
        seed = source().seed
        self._rng = random.Random(seed if seed is None else seed + os.getpid())
        self._lock = threading.Lock()

    def delay(self, event_name: str = "", **_: Any) -> None:
        if event_name.endswith(".ReceiveMessage"):
            return  # after its answer: delay_receive
        send_delay_s = self._source().send_delay_s
        if send_delay_s and event_name.rsplit(".", 1)[-1] in ("SendMessage", "SendMessageBatch"):
            time.sleep(send_delay_s)
        self._sleep_latency()

    @staticmethod
    def note_long_poll(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context[_LONG_POLL] = int(params.get("WaitTimeSeconds") or 0) > 0

    def delay_receive(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if parsed.get("Messages") or not context.get(_LONG_POLL):
            self._sleep_latency()

    def count_call(self, model: Any, **_: Any) -> None:
        calls_log = self._source().calls_log
        if calls_log:
            service = model.service_model.service_id.hyphenize()
            line = json.dumps({"operation": f"{service}.{model.name}", "pid": os.getpid()})
            with open(calls_log, "a", encoding="utf-8") as out:
                out.write(line + "\n")

    def _sleep_latency(self) -> None:
        faults = self._source()
        median = faults.latency_median_ms
        if median:
            sigma = math.log(faults.latency_p99_factor) / _Z99
            with self._lock:
                seconds = self._rng.lognormvariate(math.log(median / 1000.0), sigma)
            time.sleep(seconds)

    def before_call(self, model: Any, **_: Any) -> tuple[Any, dict[str, Any]] | None:
        """The answer a failing call gets instead of AWS's, or None to make the call."""
        service = model.service_model.service_id.hyphenize()
        if service not in _SIGNED_SERVICES:
            return None
        faults, now, operation = self._source(), time.time(), f"{service}.{model.name}"
        if faults.credentials_expired(now):
            self._record(faults, "credentials_expired", operation)
            return _error_response(
                403, _EXPIRED_TOKEN_CODES[service], "The security token included in the request is expired"
            )
        if operation == "sqs.SendMessage":
            with self._lock:
                failing = faults.send_failure_rate and self._rng.random() < faults.send_failure_rate
            if failing:
                self._record(faults, "send_failed", operation)
                return _error_response(
                    500, "InternalError", "We encountered an internal error. Please try again."
                )
        if operation == "sqs.ReceiveMessage" and faults.in_outage(now):
            self._record(faults, "receive_failed", operation)
            return _error_response(503, "ServiceUnavailable", "Service is unable to handle request.")
        return None

    @staticmethod
    def _record(faults: SqsFaults, what: str, operation: str) -> None:
        if faults.log_file:
            line = json.dumps({"event": what, "operation": operation, "pid": os.getpid(), "at": time.time()})
            with open(faults.log_file, "a", encoding="utf-8") as out:
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


def _source(faults: SqsFaults | FaultsFile) -> Callable[[], SqsFaults]:
    return faults.current if isinstance(faults, FaultsFile) else lambda: faults


def install(events: Any, faults: SqsFaults | FaultsFile) -> None:
    """Register the handlers on a botocore event emitter (a session's or a client's ``meta.events``)."""
    injector = _Injector(_source(faults))
    events.register("before-send.sqs", injector.delay)
    events.register("provide-client-params.sqs.ReceiveMessage", injector.note_long_poll)
    events.register("after-call.sqs.ReceiveMessage", injector.delay_receive)
    # Before the fault handler: a call a fault answers is still a call its caller made.
    events.register("before-call", injector.count_call)
    events.register("before-call", injector.before_call)


def install_in_every_session(faults: SqsFaults | FaultsFile) -> None:
    """Every botocore session this process creates from now on gets the handlers (sitecustomize's job)."""
    import botocore.session

    original = botocore.session.Session.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        install(self.get_component("event_emitter"), faults)

    botocore.session.Session.__init__ = init  # type: ignore[method-assign]


def process_env(faults: SqsFaults | FaultsFile, base_pythonpath: str | None = None) -> dict[str, str]:
    """The environment that gives another Python process (and its children) the same faults: fixed ones, or
    those a ``FaultsFile`` holds at each call."""
    paths = [str(SITE_DIR), str(REPO_ROOT), *filter(None, [base_pythonpath])]
    setting = {FILE_ENV: str(faults.path)} if isinstance(faults, FaultsFile) else {ENV: faults.to_json()}
    return {**setting, "PYTHONPATH": os.pathsep.join(paths)}


def injected(log_file: str | Path, *, by: str = "event") -> dict[str, int]:
    """How many failures every process injected, by kind (or by ``"operation"``, e.g. ``lambda.Invoke``)."""
    counts: dict[str, int] = {}
    path = Path(log_file)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            key = json.loads(line).get(by, "?")
            counts[key] = counts.get(key, 0) + 1
    return counts


def calls(calls_log: str | Path, pids: set[int] | None = None) -> dict[str, int]:
    """How many AWS calls were made, by operation (``sqs.ReceiveMessage``), by the processes ``pids`` (all if
    None), from a ``calls_log``."""
    counts: dict[str, int] = {}
    path = Path(calls_log)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            call = json.loads(line)
            if pids is None or call["pid"] in pids:
                counts[call["operation"]] = counts.get(call["operation"], 0) + 1
    return dict(sorted(counts.items()))

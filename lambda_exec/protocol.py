"""Wire messages shared by the LambdaExecutor, the in-Lambda handler and the local Lambda service.

Standard library only: the handler imports this module on every cold start.

Every message travels in a signed envelope::

    {"v": 2, "payload": "<JSON text>", "sig": "<hex HMAC-SHA256 of the payload text>"}

The payload is kept as text so that the signature covers exactly the bytes that were signed, whatever JSON
library re-serialises the envelope on the way (SQS, Lambda's DLQ).

Keys. Only the executor holds the signing secret. It signs events with a key derived from it (so that it can
trust a dead letter, whose body is the event) and derives one result key per dispatch, sent in that dispatch's
event: the function signs that dispatch's results with it and can sign no other's. The executor checks a result
with the key it derives from its secret and the result's own ``dispatch_id``. The function cannot check an
event's signature: events are authenticated by IAM (only principals allowed ``lambda:InvokeFunction`` can send
one), and the handler checks their structure, version and ``not_after`` (``read_event``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from hybrid_router.lambda_exec.wire_fields import (
    HEX_SHA256_RE,
    MessageError,
    count,
    finite_number,
    hex_key,
    optional_bool,
    optional_count,
    optional_str,
    required_str,
)

# 2: results signed with a per-dispatch key that the event carries; the function holds no secret.
PROTOCOL_VERSION = 2
EVENT_KIND = "hybrid_router.invoke"
RESULT_KIND = "hybrid_router.result"
# A results message older than this is stale (replayed or stuck) and ignored.
DEFAULT_MAX_MESSAGE_AGE_S = 6 * 3600 + 600
# Labels of the keys derived from the secret: an event key and one result key per dispatch id.
_EVENT_KEY_LABEL = b"hybrid_router/event-key/v2"
_RESULT_KEY_LABEL = b"hybrid_router/result-key/v2\x00"


class Outcome(str, Enum):
    """How a Lambda run ended, as the handler, the local service or the DLQ tells it."""

    SUCCESS = "success"
    FAILED = "failed"  # the task's own code failed: an ordinary task failure
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    RUNTIME_CRASH = "runtime_crash"
    DEAD_LETTERED = "dead_lettered"
    THROTTLED = "throttled"
    EVENT_EXPIRED = "event_expired"
    # The handler stopped the run because it could not report STARTED: a run no executor knew of.
    UNREPORTED = "unreported"
    # The execution API refused this run's /run (409): another run (a duplicate delivery of the same event, or
    # a re-invoke after an ambiguous answer) holds the task. Never a failure of the task.
    NOT_CLAIMED = "not_claimed"

    @property
    def is_infrastructure(self) -> bool:
        return self not in (Outcome.SUCCESS, Outcome.FAILED, Outcome.NOT_CLAIMED)


# Outcomes of a run that never held the task: it refused the event (too late) or /run refused it.
UNCLAIMED_OUTCOMES = frozenset({Outcome.NOT_CLAIMED, Outcome.EVENT_EXPIRED})


class Phase(str, Enum):
    STARTED = "started"
    FINISHED = "finished"


@dataclass(frozen=True)
class TaskRef:
    """The fields of Airflow's TaskInstanceKey, without importing Airflow."""

    dag_id: str
    task_id: str
    run_id: str
    try_number: int
    map_index: int = -1

    @classmethod
    def from_dict(cls, data: Any) -> TaskRef:
        if not isinstance(data, dict):
            raise MessageError("task: expected an object")
        try:
            ref = cls(
                dag_id=data["dag_id"],
                task_id=data["task_id"],
                run_id=data["run_id"],
                try_number=data["try_number"],
                map_index=data.get("map_index", -1),
            )
        except KeyError as exc:
            raise MessageError(f"task: missing field {exc.args[0]!r}") from None
        for name in ("dag_id", "task_id", "run_id"):
            if not isinstance(getattr(ref, name), str):
                raise MessageError(f"task.{name}: expected a string")
        for name in ("try_number", "map_index"):
            value = getattr(ref, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise MessageError(f"task.{name}: expected an integer")
        return ref

    def as_tuple(self) -> tuple[str, str, str, int, int]:
        return (self.dag_id, self.task_id, self.run_id, self.try_number, self.map_index)


@dataclass(frozen=True)
class InvokeEvent:
    """What the executor sends to the function: one Airflow workload and where to report."""

    dispatch_id: str
    task: TaskRef
    workload: str  # ExecuteTask JSON, as Airflow's workers read it; holds the execution-API token
    results_queue_url: str
    issued_at: float
    # The handler refuses to start the task after this moment: a late or duplicated delivery of an old event
    # must not run a task that may have moved to another executor.
    not_after: float
    kind: str = EVENT_KIND
    # The hex key that signs this dispatch's results, and no other's; ``seal_event`` sets it from the secret.
    result_key: str = field(default="", repr=False)
    # Asked of a run that reports STARTED (0: nothing): send STARTED again every ``heartbeat_s``, and stop the
    # task once none could be sent for ``lease_s``, so that its silence means it no longer acts (``liveness``).
    heartbeat_s: float = 0.0
    lease_s: float = 0.0

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    def result_signing_key(self) -> bytes:
        return bytes.fromhex(self.result_key)

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> InvokeEvent:
        if data.get("kind") != EVENT_KIND:
            raise MessageError("kind: not an invocation event")
        try:
            event = cls(
                dispatch_id=required_str(data, "dispatch_id"),
                task=TaskRef.from_dict(data.get("task")),
                workload=required_str(data, "workload"),
                results_queue_url=required_str(data, "results_queue_url"),
                issued_at=finite_number(data, "issued_at"),
                not_after=finite_number(data, "not_after"),
                result_key=hex_key(data, "result_key"),
                heartbeat_s=_seconds(data, "heartbeat_s"),
                lease_s=_seconds(data, "lease_s"),
            )
        except TypeError as exc:  # pragma: no cover - defensive
            raise MessageError(str(exc)) from None
        if (event.heartbeat_s > 0) != (event.lease_s > event.heartbeat_s):
            # A lease no heartbeat renews would stop every run that outlives it; one without a lease is no promise.
            raise MessageError("lease_s: expected more than heartbeat_s, or both 0")
        return event


@dataclass(frozen=True)
class RunUsage:
    """What one run used, in the figures of Lambda's ``REPORT`` line (``tree_memory.run_usage``): the handler's
    final result carries them, and the local Lambda service writes that line with figures measured the same way."""

    duration_ms: float  # from the start of the invocation to its final result
    billed_duration_ms: int  # the duration rounded up to the millisecond, as Lambda bills it
    memory_size_mb: int | None  # the function's memory size; None when the runtime does not say
    # Lambda's "Max Memory Used": the peak of the sandbox's process tree, a page shared in it counted once
    peak_memory_mb: int

    @classmethod
    def from_payload(cls, data: Any) -> RunUsage | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise MessageError("usage: expected an object")
        return cls(
            duration_ms=finite_number(data, "duration_ms"),
            billed_duration_ms=count(data, "billed_duration_ms"),
            memory_size_mb=optional_count(data, "memory_size_mb"),
            peak_memory_mb=count(data, "peak_memory_mb"),
        )


@dataclass(frozen=True)
class ResultMessage:
    """What the handler (or the local service, for runs it killed) reports to the results queue."""

    phase: Phase
    dispatch_id: str
    task: TaskRef
    sent_at: float
    started_at: float | None = None
    outcome: Outcome | None = None  # set when phase is FINISHED
    return_code: int | None = None
    detail: str = ""
    request_id: str = ""
    function_name: str = ""
    log_stream: str = ""
    kind: str = field(default=RESULT_KIND)
    # Each delivered copy of an event is its own run, named by the handler (a uuid4 hex); "" from a handler
    # older than run ids. ``claimed``: the run's /run succeeded, so it holds the task (STARTED implies it).
    run_id: str = ""
    claimed: bool = False
    usage: RunUsage | None = None  # on FINISHED from a handler that measures its runs
    # On STARTED: the run stops itself once it could send no STARTED for this long (0: it makes no such promise).
    lease_s: float = 0.0

    def to_payload(self) -> dict[str, Any]:
        data = asdict(self)
        data["phase"] = self.phase.value
        data["outcome"] = self.outcome.value if self.outcome else None
        return data

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> ResultMessage:
        if data.get("kind") != RESULT_KIND:
            raise MessageError("kind: not a result message")
        try:
            phase = Phase(data.get("phase"))
        except ValueError:
            raise MessageError("phase: expected 'started' or 'finished'") from None
        outcome_raw = data.get("outcome")
        try:
            outcome = Outcome(outcome_raw) if outcome_raw is not None else None
        except ValueError:
            raise MessageError("outcome: unknown value") from None
        if phase is Phase.FINISHED and outcome is None:
            raise MessageError("outcome: required when phase is 'finished'")
        return_code = data.get("return_code")
        if return_code is not None and (not isinstance(return_code, int) or isinstance(return_code, bool)):
            raise MessageError("return_code: expected an integer")
        started_at = None if data.get("started_at") is None else finite_number(data, "started_at")
        return cls(
            phase=phase,
            dispatch_id=required_str(data, "dispatch_id"),
            task=TaskRef.from_dict(data.get("task")),
            sent_at=finite_number(data, "sent_at"),
            started_at=started_at,
            outcome=outcome,
            return_code=return_code,
            detail=optional_str(data, "detail"),
            request_id=optional_str(data, "request_id"),
            function_name=optional_str(data, "function_name"),
            log_stream=optional_str(data, "log_stream"),
            run_id=optional_str(data, "run_id"),
            claimed=optional_bool(data, "claimed"),
            usage=RunUsage.from_payload(data.get("usage")),
            lease_s=_seconds(data, "lease_s"),
        )


def _seconds(data: dict[str, Any], name: str) -> float:
    """An optional duration: 0 when absent (a sender older than the field)."""
    if data.get(name) is None:
        return 0.0
    value = finite_number(data, name)
    if value < 0:
        raise MessageError(f"{name}: expected a number of seconds >= 0")
    return value


# -- keys --------------------------------------------------------------------------------------------------------


def normalise_secret(secret: str | bytes) -> bytes:
    """The signing secret as the executor's configuration, a secrets backend or a file gives it: surrounding
    whitespace (a trailing newline) is not part of it. Every key is derived from this; raises ValueError if empty.
    """
    if isinstance(secret, bytes):
        try:
            secret = secret.decode("utf-8")
        except UnicodeDecodeError:  # not text: only ASCII whitespace can be told apart
            normalised = secret.strip()
    if isinstance(secret, str):
        normalised = secret.strip().encode("utf-8")
    if not normalised:
        raise ValueError("a signing secret is required")
    return normalised


def _derive(secret: str | bytes, label: bytes) -> bytes:
    return hmac.new(normalise_secret(secret), label, hashlib.sha256).digest()


def event_key(secret: str | bytes) -> bytes:
    """The key that signs events: only the executor holds it (and checks dead letters with it)."""
    return _derive(secret, _EVENT_KEY_LABEL)


def result_key(secret: str | bytes, dispatch_id: str) -> bytes:
    """The key that signs the results of ``dispatch_id``, and of no other dispatch."""
    return _derive(secret, _RESULT_KEY_LABEL + dispatch_id.encode("utf-8", "surrogatepass"))


# -- envelopes ---------------------------------------------------------------------------------------------------


def _signature(text: str, key: bytes) -> str:
    return hmac.new(key, _utf8(text, "payload"), hashlib.sha256).hexdigest()


def _utf8(text: str, name: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON can carry one, UTF-8 cannot
        raise MessageError(f"{name}: not valid Unicode") from None


def _json(text: str | bytes, name: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise MessageError(f"{name} is not JSON") from None


def seal(payload: dict[str, Any], key: bytes) -> str:
    """Serialise a payload and sign it with ``key`` into an envelope (the text sent to Lambda or SQS)."""
    if not key:
        raise ValueError("a signing key is required")
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    return json.dumps({"v": PROTOCOL_VERSION, "payload": text, "sig": _signature(text, key)})


def _read_envelope(body: str | bytes | dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """The envelope's payload text, its signature (not checked) and the parsed payload."""
    envelope = _json(body, "body") if isinstance(body, (str, bytes)) else body
    if not isinstance(envelope, dict):
        raise MessageError("envelope: expected an object")
    version = envelope.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        shown = repr(version) if isinstance(version, (int, float, str, type(None))) else "of another type"
        raise MessageError(f"envelope: unsupported version {shown[:20]} (expected {PROTOCOL_VERSION})")
    text, sig = envelope.get("payload"), envelope.get("sig")
    if not isinstance(text, str) or not isinstance(sig, str):
        raise MessageError("envelope: unsigned")
    if not HEX_SHA256_RE.fullmatch(sig):
        raise MessageError("envelope: the signature is not a hex HMAC-SHA256")
    _utf8(text, "payload")
    payload = _json(text, "payload")
    if not isinstance(payload, dict):
        raise MessageError("payload: expected an object")
    return text, sig, payload


def _check(text: str, sig: str, key: bytes) -> None:
    if not hmac.compare_digest(_signature(text, key), sig):
        raise MessageError("envelope: bad signature")


def open_envelope(body: str | bytes | dict[str, Any], key: bytes) -> dict[str, Any]:
    """Check an envelope's signature against ``key`` and return its payload; raise MessageError otherwise."""
    text, sig, payload = _read_envelope(body)
    _check(text, sig, key)
    return payload


def seal_event(event: InvokeEvent, secret: str | bytes) -> str:
    """The executor's signed event, carrying the result key of its dispatch (derived from ``secret``)."""
    payload = event.to_payload()
    payload["result_key"] = result_key(secret, event.dispatch_id).hex()
    return seal(payload, event_key(secret))


def open_event(body: str | bytes | dict[str, Any], secret: str | bytes) -> InvokeEvent:
    """An event whose signature the executor checks with its secret (a dead letter's body)."""
    return InvokeEvent.from_payload(open_envelope(body, event_key(secret)))


def read_event(body: str | bytes | dict[str, Any]) -> InvokeEvent:
    """An event as the function reads it: structure and version checked, the signature not (the function holds
    no key to check it with; IAM decides who may invoke it). The caller checks ``not_after``."""
    return InvokeEvent.from_payload(_read_envelope(body)[2])


def seal_result(result: ResultMessage, key: bytes) -> str:
    """A result signed with its dispatch's result key (``InvokeEvent.result_signing_key``)."""
    return seal(result.to_payload(), key)


def open_result(
    body: str | bytes,
    secret: str | bytes,
    *,
    now: float | None = None,
    max_age_s: float = DEFAULT_MAX_MESSAGE_AGE_S,
) -> ResultMessage:
    """A result checked with the key the executor derives from ``secret`` for the dispatch the result names:
    a key held by one dispatch's run signs nothing another dispatch accepts."""
    text, sig, payload = _read_envelope(body)
    _check(text, sig, result_key(secret, required_str(payload, "dispatch_id")))
    result = ResultMessage.from_payload(payload)
    now = time.time() if now is None else now
    if now - result.sent_at > max_age_s:
        raise MessageError("result: stale message")
    return result


_TOKEN_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def scrub(text: str, limit: int = 2000) -> str:
    """Remove anything that looks like a JWT (the execution-API token) and cap the length."""
    cleaned = _TOKEN_RE.sub("<token>", text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."

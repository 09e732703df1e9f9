"""Wire messages shared by the LambdaExecutor, the in-Lambda handler and the local Lambda service.

Standard library only: the handler imports this module on every cold start.

Every message travels in a signed envelope::

    {"v": 1, "payload": "<JSON text>", "sig": "<hex HMAC-SHA256 of the payload text>"}

The payload is kept as text so that the signature covers exactly the bytes that were signed, whatever JSON
library re-serialises the envelope on the way (SQS, Lambda's DLQ).
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

PROTOCOL_VERSION = 1
EVENT_KIND = "hybrid_router.invoke"
RESULT_KIND = "hybrid_router.result"
# A results message older than this is stale (replayed or stuck) and ignored.
DEFAULT_MAX_MESSAGE_AGE_S = 6 * 3600 + 600


class MessageError(ValueError):
    """A message that is malformed, unsigned, wrongly signed or stale. Never carries a token."""


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

    @property
    def is_infrastructure(self) -> bool:
        return self not in (Outcome.SUCCESS, Outcome.FAILED)


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

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> InvokeEvent:
        if data.get("kind") != EVENT_KIND:
            raise MessageError("kind: not an invocation event")
        try:
            event = cls(
                dispatch_id=_str(data, "dispatch_id"),
                task=TaskRef.from_dict(data.get("task")),
                workload=_str(data, "workload"),
                results_queue_url=_str(data, "results_queue_url"),
                issued_at=_num(data, "issued_at"),
                not_after=_num(data, "not_after"),
            )
        except TypeError as exc:  # pragma: no cover - defensive
            raise MessageError(str(exc)) from None
        return event


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
        started_at = data.get("started_at")
        if started_at is not None and not isinstance(started_at, (int, float)):
            raise MessageError("started_at: expected a number")
        return cls(
            phase=phase,
            dispatch_id=_str(data, "dispatch_id"),
            task=TaskRef.from_dict(data.get("task")),
            sent_at=_num(data, "sent_at"),
            started_at=started_at,
            outcome=outcome,
            return_code=return_code,
            detail=_opt_str(data, "detail"),
            request_id=_opt_str(data, "request_id"),
            function_name=_opt_str(data, "function_name"),
            log_stream=_opt_str(data, "log_stream"),
        )


def _str(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise MessageError(f"{name}: expected a non-empty string")
    return value


def _opt_str(data: dict[str, Any], name: str) -> str:
    value = data.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MessageError(f"{name}: expected a string")
    return value


def _num(data: dict[str, Any], name: str) -> float:
    value = data.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise MessageError(f"{name}: expected a number")
    return float(value)


def _signature(payload: str, secret: bytes) -> str:
    return hmac.new(secret, payload.encode("utf-8"), hashlib.sha256).hexdigest()


def seal(payload: dict[str, Any], secret: bytes) -> str:
    """Serialise and sign a payload into an envelope (the text sent to Lambda or SQS)."""
    if not secret:
        raise ValueError("a signing secret is required")
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    return json.dumps({"v": PROTOCOL_VERSION, "payload": text, "sig": _signature(text, secret)})


def open_envelope(body: str | bytes | dict[str, Any], secret: bytes) -> dict[str, Any]:
    """Check an envelope's signature and return its payload; raise MessageError otherwise."""
    if isinstance(body, (str, bytes)):
        try:
            envelope = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise MessageError("body is not JSON") from None
    else:
        envelope = body
    if not isinstance(envelope, dict):
        raise MessageError("envelope: expected an object")
    if envelope.get("v") != PROTOCOL_VERSION:
        raise MessageError(f"envelope: unsupported version {envelope.get('v')!r}")
    text, sig = envelope.get("payload"), envelope.get("sig")
    if not isinstance(text, str) or not isinstance(sig, str):
        raise MessageError("envelope: unsigned")
    if not hmac.compare_digest(_signature(text, secret), sig):
        raise MessageError("envelope: bad signature")
    try:
        payload = json.loads(text)
    except ValueError:
        raise MessageError("payload is not JSON") from None
    if not isinstance(payload, dict):
        raise MessageError("payload: expected an object")
    return payload


def seal_event(event: InvokeEvent, secret: bytes) -> str:
    return seal(event.to_payload(), secret)


def open_event(body: str | bytes | dict[str, Any], secret: bytes) -> InvokeEvent:
    return InvokeEvent.from_payload(open_envelope(body, secret))


def seal_result(result: ResultMessage, secret: bytes) -> str:
    return seal(result.to_payload(), secret)


def open_result(
    body: str | bytes,
    secret: bytes,
    *,
    now: float | None = None,
    max_age_s: float = DEFAULT_MAX_MESSAGE_AGE_S,
) -> ResultMessage:
    result = ResultMessage.from_payload(open_envelope(body, secret))
    now = time.time() if now is None else now
    if now - result.sent_at > max_age_s:
        raise MessageError("result: stale message")
    return result


_TOKEN_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def scrub(text: str, limit: int = 2000) -> str:
    """Remove anything that looks like a JWT (the execution-API token) and cap the length."""
    cleaned = _TOKEN_RE.sub("<token>", text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."

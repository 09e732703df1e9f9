"""The wire messages: per-dispatch result keys, the secret's whitespace, and opening any text. Only a
``MessageError`` may come out of opening a message, whatever it holds; through the executor, a malformed message
is deleted at its first sighting and logged once, never released again and again.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import replace
from typing import Any

import pytest
from airflow.utils.state import TaskInstanceState
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.workloads import make_workload
from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.executor import LambdaExecutor
from hybrid_router.lambda_exec.external_id import parse_lambda_external_id
from hybrid_router.lambda_exec.protocol import (
    InvokeEvent,
    MessageError,
    Outcome,
    Phase,
    ResultMessage,
    RunUsage,
    TaskRef,
)

from .executor_support import SECRET, drive
from .fakes import FakeLambda, FakeSqs, fake_clients

RESULTS = "http://sqs.local/results"
NOW = 1_800_000_000.0

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def make_event(dispatch_id: str = "dispatch-a") -> InvokeEvent:
    return InvokeEvent(
        dispatch_id, TaskRef("dag", "task", "run", 1), '{"token": "x"}', RESULTS, NOW, NOW + 300
    )


def make_result(dispatch_id: str, outcome: Outcome = Outcome.SUCCESS) -> ResultMessage:
    return ResultMessage(
        phase=Phase.FINISHED,
        dispatch_id=dispatch_id,
        task=TaskRef("dag", "task", "run", 1),
        sent_at=NOW,
        started_at=NOW - 1,
        outcome=outcome,
        return_code=0,
    )


# -- keys --------------------------------------------------------------------------------------------------------


def test_a_result_key_signs_its_own_dispatch_only():
    event = protocol.read_event(
        protocol.seal_event(make_event("dispatch-a"), SECRET)
    )  # what the function gets
    key_a = event.result_signing_key()
    assert key_a == protocol.result_key(SECRET, "dispatch-a") and len(key_a) == 32
    assert key_a != protocol.result_key(SECRET, "dispatch-b") != protocol.result_key("other", "dispatch-b")

    assert protocol.open_result(protocol.seal_result(make_result("dispatch-a"), key_a), SECRET, now=NOW)
    # A run of dispatch A (or a task inside it) claiming dispatch B: refused.
    with pytest.raises(MessageError, match="bad signature"):
        protocol.open_result(protocol.seal_result(make_result("dispatch-b"), key_a), SECRET, now=NOW)
    # The secret itself no longer signs results, nor does the key that signs events.
    for key in (SECRET.encode(), protocol.event_key(SECRET)):
        with pytest.raises(MessageError, match="bad signature"):
            protocol.open_result(protocol.seal_result(make_result("dispatch-a"), key), SECRET, now=NOW)


def test_events_are_signed_for_the_executor_and_read_by_the_function_without_a_key():
    sealed = protocol.seal_event(make_event(), SECRET)
    assert protocol.open_event(sealed, SECRET).result_key == protocol.result_key(SECRET, "dispatch-a").hex()
    with pytest.raises(MessageError, match="bad signature"):
        protocol.open_event(sealed, "another-secret")  # a dead letter the executor did not send
    # The key travels in the event, but no repr shows it.
    assert protocol.read_event(sealed).result_key not in repr(protocol.read_event(sealed))
    # An event of the previous protocol (no result key, signed with the secret itself) is refused by version.
    old = json.loads(sealed)
    old["v"] = 1
    with pytest.raises(MessageError, match="unsupported version"):
        protocol.read_event(old)


def test_whitespace_around_the_secret_is_not_part_of_it():
    assert protocol.normalise_secret("s3cret\n") == protocol.normalise_secret(b" s3cret\r\n") == b"s3cret"
    for blank in ("", " \n", b"\t"):
        with pytest.raises(ValueError):
            protocol.normalise_secret(blank)
    # Whichever side has the trailing newline (a file, `echo`, a secrets backend), the keys agree.
    sealed = protocol.seal_event(make_event(), "s3cret\n")
    assert (
        protocol.open_event(sealed, "s3cret").result_key == protocol.result_key(b"s3cret", "dispatch-a").hex()
    )
    body = protocol.seal_result(make_result("dispatch-a"), protocol.result_key("s3cret", "dispatch-a"))
    assert protocol.open_result(body, b"s3cret\n", now=NOW).dispatch_id == "dispatch-a"


def test_numbers_must_be_finite():
    # NaN or infinity would pass every check against a clock: a result never stale, an event never late.
    for value in (math.nan, math.inf, 10**400):
        payload = make_result("dispatch-a").to_payload() | {"sent_at": value}
        body = protocol.seal(payload, protocol.result_key(SECRET, "dispatch-a"))
        with pytest.raises(MessageError, match="sent_at"):
            protocol.open_result(body, SECRET, now=NOW)
        late = event_payload() | {"not_after": value}
        with pytest.raises(MessageError, match="not_after"):
            protocol.read_event(protocol.seal(late, protocol.event_key(SECRET)))


def test_a_result_carries_what_its_run_used():
    key = protocol.result_key(SECRET, "dispatch-a")

    def usage_read_back(usage: RunUsage | None) -> RunUsage | None:
        body = protocol.seal_result(replace(make_result("dispatch-a"), usage=usage), key)
        return protocol.open_result(body, SECRET, now=NOW).usage

    usage = RunUsage(duration_ms=1234.56, billed_duration_ms=1235, memory_size_mb=512, peak_memory_mb=187)
    assert usage_read_back(usage) == usage
    assert replace(make_result("dispatch-a"), usage=usage).to_payload()["usage"] == {
        "duration_ms": 1234.56,
        "billed_duration_ms": 1235,
        "memory_size_mb": 512,
        "peak_memory_mb": 187,
    }
    # From a handler older than run measurements, or a function whose runtime does not say its size.
    assert usage_read_back(None) is None
    assert usage_read_back(replace(usage, memory_size_mb=None)) == replace(usage, memory_size_mb=None)
    fields = {"duration_ms": 1.0, "billed_duration_ms": 1, "memory_size_mb": 512, "peak_memory_mb": 1}
    for bad, named in (
        ("1 MB", "usage"),
        (fields | {"billed_duration_ms": -1}, "billed_duration_ms"),
        (fields | {"peak_memory_mb": True}, "peak_memory_mb"),
        (fields | {"memory_size_mb": 1.5}, "memory_size_mb"),
        (fields | {"duration_ms": math.nan}, "duration_ms"),
        ({k: v for k, v in fields.items() if k != "peak_memory_mb"}, "peak_memory_mb"),
    ):
        payload = make_result("dispatch-a").to_payload() | {"usage": bad}
        with pytest.raises(MessageError, match=named):
            protocol.open_result(protocol.seal(payload, key), SECRET, now=NOW)


# -- fuzzing the opener ------------------------------------------------------------------------------------------

# Characters that upset encoders and comparisons: lone surrogates, non-ASCII, NUL, JSON's own.
ODD_CHARACTERS = ["\ud800", "\udfff", "\u00e9", "\x00", "\u2028", '"', "\\", "{", "0", "a"]
odd_text = st.text(st.characters(exclude_categories=()) | st.sampled_from(ODD_CHARACTERS), max_size=80)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | odd_text
)
structures = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(odd_text, children, max_size=4),
    max_leaves=20,
)
RESULT_PAYLOAD = replace(make_result("dispatch-a"), usage=RunUsage(812.5, 813, 512, 190)).to_payload()


@functools.cache
def event_payload() -> dict[str, Any]:
    return json.loads(json.loads(protocol.seal_event(make_event(), SECRET))["payload"])


@st.composite
def mutated(draw: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with a few fields deleted or replaced by anything."""
    data = dict(payload)
    for name in draw(st.lists(st.sampled_from(sorted(payload)), max_size=3)):
        if draw(st.booleans()):
            data.pop(name, None)
        else:
            data[name] = draw(structures)
    return data


@st.composite
def envelopes(draw: Any) -> str:
    """Envelopes near the real thing: any version, any payload text, a random or a correct signature."""
    kind = draw(st.sampled_from(["result", "event", "text"]))
    if kind == "text":
        text = draw(odd_text)
    else:
        data = draw(mutated(RESULT_PAYLOAD if kind == "result" else event_payload()))
        text = json.dumps(data, ensure_ascii=draw(st.booleans()), separators=(",", ":"), sort_keys=True)
    if draw(st.booleans()):
        # Correctly signed: what a run holding its own dispatch's key could send, to reach the field checks.
        try:
            dispatch_id = json.loads(text).get("dispatch_id")
        except (ValueError, AttributeError):
            dispatch_id = None
        if kind == "event":
            key = protocol.event_key(SECRET)
        else:
            key = protocol.result_key(SECRET, dispatch_id if isinstance(dispatch_id, str) else "x")
        sig: Any = protocol._signature(text, key) if "\ud800" not in text else draw(odd_text)
    else:
        sig = draw(odd_text | scalars)
    envelope = {
        "v": protocol.PROTOCOL_VERSION if draw(st.integers(0, 4)) else draw(scalars),
        "payload": text if draw(st.integers(0, 9)) else draw(scalars),
        "sig": sig,
    }
    return json.dumps(envelope, ensure_ascii=draw(st.booleans()))


def assert_only_message_errors(body: Any) -> None:
    """Open ``body`` as the executor and the function do; only a MessageError or a well-typed message may result."""
    for open_ in (
        lambda: protocol.open_result(body, SECRET, now=NOW),
        lambda: protocol.open_event(body, SECRET),
        lambda: protocol.read_event(body),
    ):
        try:
            message = open_()
        except MessageError:
            continue
        if isinstance(message, ResultMessage):
            assert math.isfinite(message.sent_at) and isinstance(message.phase, Phase)
            assert message.started_at is None or math.isfinite(message.started_at)
            usage = message.usage
            assert usage is None or (
                math.isfinite(usage.duration_ms)
                and usage.billed_duration_ms >= 0
                and usage.peak_memory_mb >= 0
            )
        else:
            assert len(message.result_signing_key()) == 32
            assert math.isfinite(message.not_after) and math.isfinite(message.issued_at)
        assert isinstance(message.task.try_number, int) and isinstance(message.task.dag_id, str)


@FUZZ
@given(odd_text | st.binary(max_size=80))
def test_any_text_opens_or_is_a_message_error(body):
    assert_only_message_errors(body)


@FUZZ
@given(envelopes())
def test_any_envelope_opens_or_is_a_message_error(body):
    assert_only_message_errors(body)
    assert_only_message_errors(json.loads(body))  # Lambda hands the handler the parsed event


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_deeply_nested_json_is_a_message_error(depth):
    assert_only_message_errors("[" * depth + "]" * depth)
    payload = "[" * depth + "]" * depth
    assert_only_message_errors(
        json.dumps({"v": protocol.PROTOCOL_VERSION, "payload": payload, "sig": "0" * 64})
    )


# -- through the executor ----------------------------------------------------------------------------------------


@pytest.fixture
def executor_on_fakes():
    created = []

    def start(sqs: FakeSqs) -> tuple[LambdaExecutor, FakeLambda]:
        lambda_ = FakeLambda()
        executor = LambdaExecutor(
            parallelism=16,
            clients=fake_clients(lambda_, sqs),
            function_name="airflow-task",
            results_queue_url=RESULTS,
            signing_secret=SECRET,
            aws_conn_id="",
            poll_wait_seconds=0,
        )
        executor.start()
        created.append(executor)
        return executor, lambda_

    yield start
    for executor in created:
        executor.terminate()


def _accepted(executor: LambdaExecutor, lambda_: FakeLambda, name: str) -> str:
    """Queue a task named ``name`` until Lambda accepted its event; the event sent."""
    workload = make_workload(name)
    executor.queue_workload(workload, session=None)
    sent = lambda: [i["Payload"].decode() for i in lambda_.invokes if name in i["Payload"].decode()]  # noqa: E731

    def accepted(events) -> bool:
        # The external id names Lambda's request once the invoke was accepted (before: the dispatch id alone).
        info = events.get(workload.ti.key, (None, None))[1]
        return bool(sent()) and isinstance(info, str) and bool(parse_lambda_external_id(info).request_id)

    drive(executor, accepted)
    return sent()[0]


def test_poison_messages_are_deleted_at_once_and_logged_once(executor_on_fakes, caplog):
    sqs = FakeSqs(redeliver_released=True, visibility_scale=0.001)  # a released message is back in 30 ms
    executor, lambda_ = executor_on_fakes(sqs)
    _accepted(executor, lambda_, "keeps-the-reader-busy")
    version = protocol.PROTOCOL_VERSION
    poison = {
        sqs.send(RESULTS, json.dumps({"v": version, "payload": "{}", "sig": "\u00e9" * 64}), receive_count=3),
        sqs.send(RESULTS, json.dumps({"v": version, "payload": "\ud800", "sig": "0" * 64}), receive_count=3),
        sqs.send(RESULTS, json.dumps({"v": version, "payload": "{}", "sig": "00"})),
    }

    with caplog.at_level(logging.DEBUG, logger="hybrid_router.lambda_exec"):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(sqs.deleted) < len(poison):
            executor.heartbeat()
            time.sleep(0.02)
        time.sleep(0.2)  # a released message would be back by now
        executor.heartbeat()

    assert sorted(sqs.deleted) == sorted(f"rh-{m}" for m in poison)
    assert sqs.released == []
    for message_id in poison:
        lines = [r for r in caplog.records if message_id in r.getMessage().split()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING and not lines[0].exc_info, lines


def test_a_result_signed_with_one_dispatchs_key_changes_no_other_dispatch(executor_on_fakes):
    sqs = FakeSqs()
    executor, lambda_ = executor_on_fakes(sqs)
    event_a = protocol.read_event(_accepted(executor, lambda_, "hostile"))
    event_b = protocol.read_event(_accepted(executor, lambda_, "victim"))
    # Everything a run of A holds: its event, with A's result key. It claims B succeeded.
    forged = replace(make_result(event_b.dispatch_id), task=event_b.task, sent_at=time.time())
    forged_id = sqs.send(RESULTS, protocol.seal_result(forged, event_a.result_signing_key()))
    own = replace(make_result(event_a.dispatch_id), task=event_a.task, sent_at=time.time())
    sqs.send(RESULTS, protocol.seal_result(own, event_a.result_signing_key()))

    key_a = next(k for k in executor.running if k.task_id == "hostile")
    events = drive(executor, lambda ev: ev.get(key_a, (None,))[0] == TaskInstanceState.SUCCESS)

    assert f"rh-{forged_id}" in sqs.deleted  # refused as forged, not kept for an owner
    # The victim's only event is the QUEUED that records its dispatch id when it is invoked.
    assert [state for k, (state, _) in events.items() if k.task_id == "victim"] in (
        [],
        [TaskInstanceState.QUEUED],
    )
    assert any(k.task_id == "victim" for k in executor.running)

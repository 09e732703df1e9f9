"""The local Lambda service's logic: functions, invocations, concurrency, async queue, retries and DLQ.

No HTTP here (``app.py`` adapts requests to these methods) and no knowledge of what the handler does: the
service is a stand-in for AWS and shares only AWS's formats with its callers.

Behaviour modelled on AWS Lambda:
- ``invoke_sync`` runs at once or raises ``TooManyRequestsException`` when the function has no free concurrency.
- ``invoke_async`` accepts the event (202) and queues it. An event that finds the function at its concurrency
  limit is throttled and goes back to the queue, to be tried again after ``throttle_retry_s``: 1 s, the wait
  doubling up to 5 min, as AWS documents (the wait counts towards the event's age); so a slot that frees is not
  taken at once by an event that is waiting out its interval. Events are dropped to the DLQ once older than the
  function's ``maximum_event_age_s``.
- A failed async run (handler error, timeout, out of memory, crash) is retried ``maximum_retry_attempts`` times
  after ``retry_delays_s``; then the event goes to the dead-letter queue: an SQS message whose body is the exact
  payload the invoker sent, with the attributes ``RequestID``, ``ErrorCode`` and ``ErrorMessage``.
- Concurrency: a function with reserved concurrency runs at most that many invocations; the others share
  ``account_concurrency`` (here a cap on the local machine, not carved out by reservations).
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybrid_router.lambda_exec.local import errors
from hybrid_router.lambda_exec.local.config import (
    AWS_MIN_EVENT_AGE_S,
    MAX_EVENT_AGE_S,
    ConfigError,
    FunctionConfig,
    ServiceConfig,
)
from hybrid_router.lambda_exec.local.dlq import DeadLetterQueues
from hybrid_router.lambda_exec.local.faults import Duplicate, FaultConfigError, Faults, FaultSettings
from hybrid_router.lambda_exec.local.sandbox import (
    Ending,
    InvocationResult,
    MemoryWatchdog,
    Sandbox,
)

log = logging.getLogger(__name__)

SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
ASYNC_PAYLOAD_LIMIT = 1024 * 1024
AWS_DEFAULT_RETRY_ATTEMPTS = 2
EXPIRY_SCAN_INTERVAL_S = 0.25
REAP_INTERVAL_S = 5.0
RUNNER_THREADS = 1024
# Every counter that stats() reports, always present (zero until it happens). The Ending values count how
# runs ended: success, handled_error, timeout, out_of_memory, crash, init_error.
COUNTERS = (
    "invocations",
    "sync_invocations",
    "async_accepted",
    "cold_starts",
    "warm_starts",
    "throttles",
    "retries",
    "expired",
    "dlq_sends",
    "dlq_failures",
    "dropped",
    "duplicates_delivered",
    "init_errors",
    "concurrency_waits",
    "throttled_retries",
    *(ending.value for ending in Ending),
)


@dataclass
class AsyncEvent:
    request_id: str
    payload: str  # exactly what the invoker sent: it is what a DLQ message carries
    received_at: float  # monotonic
    attempts: int = 0  # runs so far
    ran: bool = False  # reached a sandbox at least once
    redeliver_after_run: bool = False  # at-least-once delivery: runs again once this run has ended
    unreserved: bool = False  # its current run holds a slot of the unreserved pool
    waited: bool = False  # found the function at its concurrency limit and waited for a slot (counted once)
    throttled: int = 0  # times in a row it found the function at its limit: sets its next wait
    last_error: dict[str, Any] = field(default_factory=dict)


class FunctionState:
    """One function: its configuration and its live state (queue, sandboxes, counters)."""

    def __init__(self, config: FunctionConfig, arn: str):
        self.config = config
        self.arn = arn
        self.last_modified = _iso_now()
        self.pending: collections.deque[AsyncEvent] = collections.deque()  # due, in arrival order
        self.delayed: list[tuple[float, int, AsyncEvent]] = []  # (due time, seq, event): retries waiting
        self.in_flight = 0
        self.max_in_flight = 0
        self.idle: list[Sandbox] = []  # warm sandboxes, most recently used last
        self.sandboxes: set[Sandbox] = set()
        self.deleted = False
        self.request_times: collections.deque[float] = collections.deque()
        self.counters: collections.Counter[str] = collections.Counter(dict.fromkeys(COUNTERS, 0))


class LambdaBackend:
    """All functions of one local service. Thread-safe: HTTP threads call it concurrently."""

    def __init__(
        self,
        config: ServiceConfig,
        base_env: Mapping[str, str],
        sqs_client_factory: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.base_env = dict(base_env)
        if config.sqs_endpoint_url:
            # Sandboxes reach the same SQS as the service unless a function says otherwise.
            self.base_env.setdefault("AWS_ENDPOINT_URL_SQS", config.sqs_endpoint_url)
        self.log_dir = Path(config.log_dir)
        self._clock = clock
        self._cond = threading.Condition()
        self._functions: dict[str, FunctionState] = {}
        self._unreserved_in_flight = 0
        self._duplicate_next = 0
        self.faults = Faults(config.faults)
        self._seq = 0
        self._stopped = False
        self._dlq = DeadLetterQueues(
            config.region,
            config.account_id,
            config.sqs_endpoint_url or self.base_env.get("AWS_ENDPOINT_URL_SQS"),
            sqs_client_factory,
        )
        self._watchdog = MemoryWatchdog()
        # Threads are made on demand; how many run at once is bounded by the concurrency claims, not here.
        self._runner = ThreadPoolExecutor(max_workers=RUNNER_THREADS, thread_name_prefix="invoke")
        self._sender = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dlq")
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="async-dispatcher", daemon=True)
        for fn in config.functions:
            self._functions[fn.name] = FunctionState(fn, self.function_arn(fn.name))

    # -- life cycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._watchdog.start()
        self._dispatcher.start()

    def shutdown(self) -> None:
        """Stop dispatching and kill every sandbox's process tree; queued events are dropped (logged)."""
        with self._cond:
            self._stopped = True
            states = list(self._functions.values())
            self._cond.notify_all()
        for state in states:
            queued = len(state.pending) + len(state.delayed)
            if queued:
                log.warning("Shutting down with %d queued events of %s not run", queued, state.config.name)
            for sandbox in list(state.sandboxes):
                sandbox.kill(Ending.CRASH)
        self._watchdog.stop()
        if self._dispatcher.is_alive():
            self._dispatcher.join(timeout=5)
        self._runner.shutdown(wait=True, cancel_futures=True)
        self._sender.shutdown(wait=True)
        for state in states:
            for sandbox in list(state.sandboxes):
                sandbox.discard(Ending.CRASH)

    # -- names --------------------------------------------------------------------------------------------

    def function_arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.config.region}:{self.config.account_id}:function:{name}"

    def _state(self, name_or_arn: str, qualifier: str | None = None) -> FunctionState:
        name, arn_qualifier = parse_function_name(name_or_arn)
        qualifier = qualifier or arn_qualifier
        state = self._functions.get(name)
        if state is None or state.deleted:
            raise errors.function_not_found(name, self.config.region, self.config.account_id)
        if qualifier not in (None, "", "$LATEST"):
            raise errors.ResourceNotFoundException(
                f"Function not found: {state.arn}:{qualifier} (the local service has only $LATEST)"
            )
        return state

    # -- functions ----------------------------------------------------------------------------------------

    def create_function(self, fn: FunctionConfig) -> dict[str, Any]:
        with self._cond:
            existing = self._functions.get(fn.name)
            if existing is not None and not existing.deleted:
                raise errors.ResourceConflictException(f"Function already exist: {fn.name}")
            state = FunctionState(fn, self.function_arn(fn.name))
            self._functions[fn.name] = state
        log.info(
            "Created function %s (handler %s, %d MB, %ss)", fn.name, fn.handler, fn.memory_mb, fn.timeout_s
        )
        return self.function_configuration(state)

    def get_function(self, name: str, qualifier: str | None = None) -> dict[str, Any]:
        state = self._state(name, qualifier)
        answer: dict[str, Any] = {
            "Configuration": self.function_configuration(state),
            "Code": {"RepositoryType": "S3", "Location": ""},
            "Tags": {},
        }
        if state.config.reserved_concurrency is not None:
            answer["Concurrency"] = {"ReservedConcurrentExecutions": state.config.reserved_concurrency}
        return answer

    def get_function_configuration(self, name: str, qualifier: str | None = None) -> dict[str, Any]:
        return self.function_configuration(self._state(name, qualifier))

    def list_functions(self) -> dict[str, Any]:
        with self._cond:
            states = [s for s in self._functions.values() if not s.deleted]
        return {"Functions": [self.function_configuration(s) for s in states]}

    def delete_function(self, name: str) -> None:
        with self._cond:
            state = self._state(name)
            state.deleted = True
            del self._functions[state.config.name]
            dropped = len(state.pending) + len(state.delayed)
            state.pending.clear()
            state.delayed.clear()
            idle, state.idle = state.idle, []
            self._cond.notify_all()
        if dropped:
            log.warning("Deleted function %s with %d queued events", state.config.name, dropped)
        for sandbox in idle:
            self._retire(state, sandbox, Ending.CRASH)

    def function_configuration(self, state: FunctionState) -> dict[str, Any]:
        fn = state.config
        data: dict[str, Any] = {
            "FunctionName": fn.name,
            "FunctionArn": state.arn,
            "Runtime": "python3.12",
            "Role": f"arn:aws:iam::{self.config.account_id}:role/local-lambda",
            "Handler": fn.handler,
            "CodeSize": 0,
            "Description": "",
            "Timeout": int(fn.timeout_s),
            "MemorySize": fn.memory_mb,
            "LastModified": state.last_modified,
            "CodeSha256": "",
            "Version": "$LATEST",
            "Environment": {"Variables": dict(fn.environment)},
            "State": "Active",
            "LastUpdateStatus": "Successful",
            "PackageType": "Zip",
            "Architectures": ["x86_64"],
            "EphemeralStorage": {"Size": 512},
        }
        if fn.dead_letter_queue_url:
            data["DeadLetterConfig"] = {"TargetArn": self._dlq.queue_arn(fn.dead_letter_queue_url)}
        return data

    # -- concurrency and event-invoke config --------------------------------------------------------------

    def put_function_concurrency(self, name: str, reserved: Any) -> dict[str, Any]:
        if not isinstance(reserved, int) or isinstance(reserved, bool) or reserved < 0:
            raise errors.InvalidParameterValueException(
                f"ReservedConcurrentExecutions: expected a non-negative integer, got {reserved!r}"
            )
        self._update(name, reserved_concurrency=reserved)
        return {"ReservedConcurrentExecutions": reserved}

    def get_function_concurrency(self, name: str) -> dict[str, Any]:
        reserved = self._state(name).config.reserved_concurrency
        return {} if reserved is None else {"ReservedConcurrentExecutions": reserved}

    def delete_function_concurrency(self, name: str) -> None:
        self._update(name, reserved_concurrency=None)

    def put_event_invoke_config(self, name: str, body: Mapping[str, Any], replace: bool) -> dict[str, Any]:
        """``PutFunctionEventInvokeConfig`` (replace: unset fields take AWS's defaults) or ``Update...``."""
        destinations = body.get("DestinationConfig") or {}
        if any((destinations.get(kind) or {}).get("Destination") for kind in ("OnSuccess", "OnFailure")):
            raise errors.InvalidParameterValueException(
                "DestinationConfig is not supported by the local Lambda service: use the function's "
                "DeadLetterConfig for failed asynchronous events"
            )
        state = self._state(name)
        age = body.get("MaximumEventAgeInSeconds")
        if age is not None and (
            not isinstance(age, int) or not AWS_MIN_EVENT_AGE_S <= age <= MAX_EVENT_AGE_S
        ):
            raise errors.InvalidParameterValueException(
                f"MaximumEventAgeInSeconds: expected {AWS_MIN_EVENT_AGE_S} to {MAX_EVENT_AGE_S}, got {age!r}"
            )
        changes: dict[str, Any] = {}
        for key, attribute, default in (
            ("MaximumRetryAttempts", "maximum_retry_attempts", AWS_DEFAULT_RETRY_ATTEMPTS),
            ("MaximumEventAgeInSeconds", "maximum_event_age_s", MAX_EVENT_AGE_S),
        ):
            if key in body:
                changes[attribute] = body[key]
            elif replace:
                changes[attribute] = default
        self._update(state.config.name, **changes)
        return self.get_event_invoke_config(name)

    def get_event_invoke_config(self, name: str) -> dict[str, Any]:
        state = self._state(name)
        return {
            "LastModified": time.time(),
            "FunctionArn": state.arn + ":$LATEST",
            "MaximumRetryAttempts": state.config.maximum_retry_attempts,
            "MaximumEventAgeInSeconds": state.config.maximum_event_age_s,
            "DestinationConfig": {"OnSuccess": {}, "OnFailure": {}},
        }

    def _update(self, name: str, **changes: Any) -> None:
        with self._cond:
            state = self._state(name)
            try:
                state.config = state.config.replace(**changes)
            except ConfigError as exc:
                raise errors.InvalidParameterValueException(str(exc)) from None
            state.last_modified = _iso_now()
            self._cond.notify_all()  # more concurrency may start queued events

    # -- invocations --------------------------------------------------------------------------------------

    def check_payload(self, payload: bytes, limit: int, operation: str) -> str:
        if len(payload) > limit:
            raise errors.RequestTooLargeException(
                f"Request must be smaller than {limit} bytes for the {operation} operation"
            )
        try:
            text = payload.decode("utf-8")
            if text.strip():
                json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise errors.InvalidRequestContentException(
                f"Could not parse request body into json: {str(exc)[:200]}"
            ) from None
        return text

    def invoke_sync(
        self, name: str, payload: bytes, qualifier: str | None = None
    ) -> tuple[str, InvocationResult]:
        state = self._state(name, qualifier)
        text = self.check_payload(payload, SYNC_PAYLOAD_LIMIT, "Invoke")
        request_id = str(uuid.uuid4())
        with self._cond:
            self._check_rate(state)
            if not self._has_capacity(state):
                state.counters["throttles"] += 1
                reason = (
                    "ReservedFunctionConcurrentInvocationLimitExceeded"
                    if state.config.reserved_concurrency is not None
                    else "ConcurrentInvocationLimitExceeded"
                )
                raise errors.TooManyRequestsException("Rate Exceeded.", reason=reason)
            unreserved = self._claim(state)
            state.counters["sync_invocations"] += 1
        try:
            result = self._execute(state, request_id, text)
        finally:
            self._release(state, unreserved)
        return request_id, result

    def invoke_async(self, name: str, payload: bytes, qualifier: str | None = None) -> str:
        state = self._state(name, qualifier)
        text = self.check_payload(payload, ASYNC_PAYLOAD_LIMIT, "InvokeAsync")
        request_id = str(uuid.uuid4())
        now = self._clock()
        with self._cond:
            self._check_rate(state)
            event = AsyncEvent(request_id, text, now)
            state.pending.append(event)
            state.counters["async_accepted"] += 1
            duplicate = self.faults.duplicate()
            if self._duplicate_next > 0:
                self._duplicate_next -= 1
                duplicate = Duplicate.NOW
            # At-least-once delivery: the same event (same request id) runs a second time.
            if duplicate is Duplicate.NOW:
                state.pending.append(AsyncEvent(request_id, text, now))
            elif duplicate is Duplicate.AFTER_END:
                event.redeliver_after_run = True
            if duplicate is not None:
                state.counters["duplicates_delivered"] += 1
            self._cond.notify_all()
        return request_id

    def dry_run(self, name: str, qualifier: str | None = None) -> None:
        self._state(name, qualifier)

    def _check_rate(self, state: FunctionState) -> None:
        limit = state.config.max_requests_per_s
        if limit is None:
            return
        now = self._clock()
        times = state.request_times
        while times and now - times[0] >= 1.0:
            times.popleft()
        if len(times) >= limit:
            state.counters["throttles"] += 1
            raise errors.TooManyRequestsException(
                "Rate Exceeded.", reason="FunctionInvocationRateLimitExceeded"
            )
        times.append(now)

    def _has_capacity(self, state: FunctionState) -> bool:
        reserved = state.config.reserved_concurrency
        if reserved is not None:
            return state.in_flight < reserved
        return self._unreserved_in_flight < self.config.account_concurrency

    def _claim(self, state: FunctionState) -> bool:
        """Take one concurrency slot (under the lock). Returns whether it came from the unreserved pool."""
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        unreserved = state.config.reserved_concurrency is None
        if unreserved:
            self._unreserved_in_flight += 1
        return unreserved

    def _release(self, state: FunctionState, unreserved: bool) -> None:
        # ``unreserved`` as claimed: the function's reserved concurrency may have changed meanwhile.
        with self._cond:
            state.in_flight -= 1
            if unreserved:
                self._unreserved_in_flight -= 1
            self._cond.notify_all()

    # -- running in a sandbox -----------------------------------------------------------------------------

    def _execute(self, state: FunctionState, request_id: str, payload: str) -> InvocationResult:
        fn = state.config
        sandbox = self._take_idle(state)
        cold = sandbox is None
        if sandbox is None:
            sandbox = Sandbox(fn, self.base_env, self.log_dir, state.arn, self.config.region)
            with self._cond:
                state.sandboxes.add(sandbox)
            self._count(state, "cold_starts")
            init_failure = sandbox.start()
            if init_failure is not None:
                self._retire(state, sandbox, Ending.INIT_ERROR)
                self._count(state, "init_errors")
                self._count(state, "invocations")
                return init_failure
        else:
            self._count(state, "warm_starts")
        self._count(state, "invocations")
        self._watchdog.watch(sandbox)
        try:
            result = sandbox.invoke(request_id, payload, fn.timeout_s, cold=cold)
        finally:
            self._watchdog.forget(sandbox)
        self._count(state, result.ending.value)
        with self._cond:
            reusable = sandbox.alive and not state.deleted and not self._stopped
            if reusable:
                state.idle.append(sandbox)
        if not reusable:
            self._retire(state, sandbox, Ending.CRASH)
        return result

    def _take_idle(self, state: FunctionState) -> Sandbox | None:
        """The most recently used warm sandbox that is still alive (one may have died while idle)."""
        while True:
            with self._cond:
                sandbox = state.idle.pop() if state.idle else None
            if sandbox is None or sandbox.alive:
                return sandbox
            log.warning("Warm sandbox %s of %s died while idle", sandbox.stream_name, state.config.name)
            self._retire(state, sandbox, Ending.CRASH)

    def _count(self, state: FunctionState, key: str) -> None:
        with self._cond:
            state.counters[key] += 1

    def _retire(self, state: FunctionState, sandbox: Sandbox, reason: Ending) -> None:
        sandbox.discard(reason)
        with self._cond:
            state.sandboxes.discard(sandbox)

    # -- the async queue ----------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        last_expiry_scan = last_reap = 0.0
        while True:
            expired: list[tuple[FunctionState, AsyncEvent]] = []
            to_run: list[tuple[FunctionState, AsyncEvent]] = []
            with self._cond:
                if self._stopped:
                    return
                now = self._clock()
                wake_at = now + 1.0
                scan = now - last_expiry_scan >= EXPIRY_SCAN_INTERVAL_S
                if scan:
                    last_expiry_scan = now
                for state in self._functions.values():
                    while state.delayed and state.delayed[0][0] <= now:
                        state.pending.append(heapq.heappop(state.delayed)[2])
                    if scan:
                        expired.extend(self._take_expired(state, now))
                    while state.pending and self._has_capacity(state):
                        event = state.pending.popleft()
                        if now - event.received_at > state.config.maximum_event_age_s:
                            expired.append((state, event))
                            continue
                        event.unreserved = self._claim(state)
                        event.throttled = 0
                        to_run.append((state, event))
                    for event in state.pending:
                        state.counters["concurrency_waits"] += not event.waited
                        event.waited = True
                    self._throttle_waiting(state, now)
                    if state.delayed:
                        wake_at = min(wake_at, state.delayed[0][0])
                    if state.pending:
                        wake_at = min(wake_at, now + EXPIRY_SCAN_INTERVAL_S)
                if not expired and not to_run:
                    self._cond.wait(timeout=max(0.005, wake_at - now))
            for state, event in expired:
                self._count(state, "expired")
                self._sender.submit(self._dead_letter, state, event, _expiry_error(state, event))
            for state, event in to_run:
                self._runner.submit(self._run_async, state, event)
            if self._clock() - last_reap >= REAP_INTERVAL_S:
                last_reap = self._clock()
                self._reap_idle()

    def _throttle_waiting(self, state: FunctionState, now: float) -> None:
        """Send the events that found no free slot back to the queue until their next try (under the lock)."""
        first, most = self.config.throttle_retry_s
        if most <= 0:
            return  # configured to wait for a slot instead
        while state.pending:
            event = state.pending.popleft()
            wait = min(most, first * 2 ** min(event.throttled, 20))
            event.throttled += 1
            self._seq += 1
            heapq.heappush(state.delayed, (now + wait, self._seq, event))
            state.counters["throttled_retries"] += 1

    def _take_expired(self, state: FunctionState, now: float) -> list[tuple[FunctionState, AsyncEvent]]:
        max_age = state.config.maximum_event_age_s
        expired = [(state, e) for e in state.pending if now - e.received_at > max_age]
        if expired:
            state.pending = collections.deque(e for e in state.pending if now - e.received_at <= max_age)
        old_delayed = [item for item in state.delayed if now - item[2].received_at > max_age]
        if old_delayed:
            expired.extend((state, item[2]) for item in old_delayed)
            state.delayed = [item for item in state.delayed if now - item[2].received_at <= max_age]
            heapq.heapify(state.delayed)
        return expired

    def _run_async(self, state: FunctionState, event: AsyncEvent) -> None:
        try:
            event.attempts += 1
            event.ran = True
            result = self._execute(state, event.request_id, event.payload)
        except Exception as exc:  # a bug here must not lose the event: treat it as a failed run
            log.exception("Running event %s of %s failed in the service", event.request_id, state.config.name)
            result = InvocationResult(
                Ending.CRASH, error={"errorType": "ServiceException", "errorMessage": str(exc)}
            )
        finally:
            self._release(state, event.unreserved)
            if event.redeliver_after_run:
                event.redeliver_after_run = False
                with self._cond:
                    state.pending.append(AsyncEvent(event.request_id, event.payload, self._clock()))
                    self._cond.notify_all()
        if not result.failed:
            return
        event.last_error = result.error
        retries_done = event.attempts - 1
        if retries_done < state.config.maximum_retry_attempts and not state.deleted:
            delays = self.config.retry_delays_s
            delay = delays[min(retries_done, len(delays) - 1)]
            with self._cond:
                self._seq += 1
                heapq.heappush(state.delayed, (self._clock() + delay, self._seq, event))
                state.counters["retries"] += 1
                self._cond.notify_all()
            log.info(
                "Event %s of %s failed (%s); retry %d in %.1fs",
                event.request_id,
                state.config.name,
                result.error.get("errorType"),
                retries_done + 1,
                delay,
            )
            return
        self._dead_letter(state, event, result.error)

    def _reap_idle(self) -> None:
        now = time.monotonic()
        stale: list[tuple[FunctionState, Sandbox]] = []
        with self._cond:
            for state in self._functions.values():
                keep = []
                for sandbox in state.idle:
                    if now - sandbox.last_used > self.config.idle_sandbox_ttl_s:
                        stale.append((state, sandbox))
                    else:
                        keep.append(sandbox)
                state.idle = keep
        for state, sandbox in stale:
            self._retire(state, sandbox, Ending.CRASH)

    # -- dead-letter queue --------------------------------------------------------------------------------

    def _dead_letter(self, state: FunctionState, event: AsyncEvent, error: Mapping[str, Any]) -> None:
        target = state.config.dead_letter_queue_url
        message = str(error.get("errorMessage") or error.get("errorType") or "unknown error")
        if self._stopped:
            # The run died because the service is stopping, not because of the function: no verdict to send.
            log.warning(
                "Service stopping: event %s of %s is not dead-lettered", event.request_id, state.config.name
            )
            return
        if not target:
            self._count(state, "dropped")
            log.warning(
                "Event %s of %s dropped after %d runs (no DLQ): %s",
                event.request_id,
                state.config.name,
                event.attempts,
                message[:200],
            )
            return
        # ErrorCode is the status of the invocation: 200 when the function ran and failed; 429 when the event
        # aged out waiting for concurrency without ever running.
        error_code = "200" if event.ran else "429"
        try:
            self._dlq.send(target, event.payload, event.request_id, error_code, message)
        except Exception:
            self._count(state, "dlq_failures")
            log.exception("Could not send event %s of %s to its DLQ", event.request_id, state.config.name)
            return
        self._count(state, "dlq_sends")
        log.info("Event %s of %s sent to the DLQ: %s", event.request_id, state.config.name, message[:200])

    # -- test hooks and statistics ------------------------------------------------------------------------

    def set_delivery_faults(self, duplicate_next: int = 0, **settings: Any) -> dict[str, Any]:
        """``duplicate_next``: deliver the next N events twice at once; other keys: ``FaultSettings``."""
        if not isinstance(duplicate_next, int) or isinstance(duplicate_next, bool) or duplicate_next < 0:
            raise errors.InvalidParameterValueException("duplicate_next: expected a non-negative integer")
        if settings:
            try:
                self.faults.configure(FaultSettings.from_dict(settings))
            except FaultConfigError as exc:
                raise errors.InvalidParameterValueException(str(exc)) from None
        with self._cond:
            self._duplicate_next = duplicate_next
        return {"duplicate_next": duplicate_next, **self.faults.stats()}

    def stats(self) -> dict[str, Any]:
        with self._cond:
            functions = {}
            totals: collections.Counter[str] = collections.Counter()
            for name, state in self._functions.items():
                entry = dict(state.counters)
                entry.update(
                    queued=len(state.pending) + len(state.delayed),
                    in_flight=state.in_flight,
                    max_in_flight=state.max_in_flight,
                    sandboxes=len(state.sandboxes),
                    idle_sandboxes=len(state.idle),
                    log_streams=sorted(s.stream_name for s in state.sandboxes),
                )
                functions[name] = entry
                totals.update({k: v for k, v in entry.items() if isinstance(v, int)})
            return {
                "functions": functions,
                "totals": dict(totals),
                "log_dir": str(self.log_dir.resolve()),
                "faults": self.faults.stats(),
            }


def parse_function_name(value: str) -> tuple[str, str | None]:
    """``name``, ``name:qualifier``, ``account:function:name[:q]`` or a full ARN -> (name, qualifier)."""
    parts = value.split(":")
    if value.startswith("arn:"):
        # arn:aws:lambda:region:account:function:name[:qualifier]
        if len(parts) < 7 or parts[5] != "function":
            raise errors.InvalidParameterValueException(f"FunctionName: not a Lambda function ARN: {value}")
        return parts[6], parts[7] if len(parts) > 7 else None
    if len(parts) >= 3 and parts[1] == "function":
        return parts[2], parts[3] if len(parts) > 3 else None
    if len(parts) == 2:
        return parts[0], parts[1]
    return value, None


def _expiry_error(state: FunctionState, event: AsyncEvent) -> dict[str, Any]:
    reason = (
        f"Event age exceeded the function's MaximumEventAgeInSeconds ({state.config.maximum_event_age_s} s)"
    )
    if event.last_error.get("errorMessage"):
        reason += f"; last error: {event.last_error['errorMessage']}"
    return {"errorType": "EventAgeExceeded", "errorMessage": reason}


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime())

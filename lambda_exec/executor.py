"""``LambdaExecutor``: runs Airflow tasks as asynchronous AWS Lambda invocations.

How one task flows:

1. ``_process_workloads`` (scheduler thread) registers a *dispatch*: a fresh ``dispatch_id`` for this run of the
   task, the workload, and its signed invoke event. An event over ``max_payload_bytes`` fails the task at once.
2. ``sync`` hands due dispatches to a bounded thread pool that calls ``Invoke(InvocationType=Event)``; the
   scheduler loop never waits for Lambda. It invokes no more runs than the function's concurrency allows, so
   events do not age in Lambda's internal queue. 202 -> the task's external id is recorded (QUEUED event);
   429 -> the dispatch stays queued here and is retried after a jittered back-off, and ``free_capacity()`` is 0
   meanwhile; after ``throttle_backoff_max`` seconds of refusals it becomes an infrastructure failure
   (``throttled``); 5xx and network errors are retried the same way (past the bound the try just fails: such
   an answer may hide an accepted event); other 4xx fail the task with the reason.
3. Two reader threads (``results.QueueReader``) long-poll the results queue and the DLQ with batch receive and
   batch delete. A signed STARTED message makes the task RUNNING (external id ``lambda:<fn>:<request>:<dispatch>``);
   a FINISHED with no STARTED before it (a run shorter than the handler's STARTED grace) does so first;
   FINISHED gives SUCCESS / FAILED, or, for TIMEOUT / EVENT_EXPIRED, a FAILED event plus an
   ``InfrastructureFailure`` the router can pop to fall back. A DLQ message (AWS's format: our event as the
   body, ``ErrorCode`` / ``ErrorMessage`` attributes) is classified as timeout / out of memory / crash / dead
   letter in the same way.

Fencing (why an old run cannot come back after the task moved elsewhere):

- every dispatch has its own ``dispatch_id`` and a ``not_after`` (issue time + ``event_max_age_seconds``); the
  handler refuses an event after ``not_after`` (reports EVENT_EXPIRED) and this executor ignores any result for
  a dispatch that is no longer current (revoked, finished, superseded);
- an infrastructure failure is only reported once the run can no longer act: the handler stopped the task
  before reporting TIMEOUT, Lambda gave up on the event (DLQ), or the event is past ``not_after`` with no start;
- the remaining risk is Lambda's at-least-once delivery: a duplicate of an event delivered before
  ``not_after`` while the task runs elsewhere could start the same try. The function should have
  ``MaximumRetryAttempts = 0`` and a short ``MaximumEventAgeInSeconds`` (the health check warns otherwise), and
  Airflow's execution API refuses a second ``/run`` for a task that is already RUNNING on another host.

Restart safety: a delivered message is deleted only one heartbeat after its event was handed to the scheduler
(except a SUCCESS, which the task already recorded in Airflow's database before its process exited), and messages for dispatches this instance does not own are left in the queue (hidden for
``unowned_visibility_timeout`` seconds) for their owner, so a task that finished while the scheduler was down is
reported once by the scheduler that adopts it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.executors.base_executor import PARALLELISM, BaseExecutor
from airflow.utils.state import TaskInstanceState
from cachetools import TTLCache

from hybrid_router.child_protocol import InfrastructureFailure
from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.aws import (
    AwsClients,
    InvokeError,
    InvokeErrorKind,
    QueueMessage,
    classify_dead_letter,
    classify_invoke_error,
    invoke_request_id,
    make_clients,
)
from hybrid_router.lambda_exec.config import (
    LAMBDA_MAX_TIMEOUT_S,
    LambdaConfigError,
    LambdaExecutorConfig,
    check_option_names,
)
from hybrid_router.lambda_exec.external_id import lambda_external_id, parse_lambda_external_id
from hybrid_router.lambda_exec.protocol import InvokeEvent, Outcome, Phase, ResultMessage, TaskRef
from hybrid_router.lambda_exec.results import Disposition, QueueReader

if TYPE_CHECKING:
    from airflow.executors import workloads
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancekey import TaskInstanceKey

METRIC_PREFIX = "lambda_executor"
# How old an event sealed at queue time may be and still be sent as it is.
PRESEALED_MAX_AGE_S = 1.0
# After not_after (or the function's timeout) a run that never reported is declared dead this much later:
# room for clock skew between this host and Lambda, and for the last message to travel through SQS.
WATCHDOG_GRACE_S = 15.0
# Infrastructure failures nobody popped (no router) are dropped after this long.
INFRA_FAILURE_TTL_S = 3600.0
# Results for finished or revoked dispatches are recognised (and deleted) for this long.
RETIRED_DISPATCH_TTL_S = 6 * 3600 + LAMBDA_MAX_TIMEOUT_S
RETIRED_DISPATCH_MAX = 200_000
# Jittered exponential back-off after a 429 or a 5xx, capped by throttle_backoff_max.
BACKOFF_INITIAL_S = 0.5
BACKOFF_CAP_S = 20.0
BACKOFF_JITTER_S = 1.0


class LambdaHealthError(RuntimeError):
    """The function or a queue is unreachable at start; the message says what to check."""


class DispatchState(str, Enum):
    PENDING = "pending"  # waiting for a pool thread (or for its back-off to pass)
    INVOKING = "invoking"  # a pool thread is calling Invoke
    ACCEPTED = "accepted"  # Lambda answered 202; the event waits in Lambda's queue
    STARTED = "started"  # the handler reported STARTED


IN_FLIGHT = frozenset({DispatchState.INVOKING, DispatchState.ACCEPTED, DispatchState.STARTED})


@dataclass
class Dispatch:
    """One run of one task try on Lambda. Mutated only by the scheduler thread."""

    key: TaskInstanceKey
    dispatch_id: str
    workload_json: str | None  # None for an adopted dispatch: it is never invoked again
    payload: str = ""  # the sealed event for the first invoke
    state: DispatchState = DispatchState.PENDING
    attempts: int = 0
    next_attempt_at: float = 0.0
    first_refused_at: float | None = None
    maybe_accepted: bool = False  # an invoke got an answer (5xx, network error) that may hide an acceptance
    last_refusal: str = ""
    issued_at: float = 0.0
    not_after: float = 0.0
    request_id: str = ""
    started_at: float | None = None
    future: Future[Any] | None = None


@dataclass(frozen=True)
class Received:
    """A message a reader delivered for a dispatch this executor owned when it arrived."""

    receipt_handle: str
    dispatch_id: str
    result: ResultMessage | None = None  # from the results queue
    dead_letter: tuple[Outcome, str, str] | None = None  # (outcome, detail, request id) from the DLQ
    queue: str = "results"
    needs_ack: bool = True  # False: the reader deletes it without waiting for the scheduler


@dataclass
class _Acks:
    results: list[str] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)


class LambdaExecutor(BaseExecutor):
    """Runs each task as an asynchronous invocation of one AWS Lambda function.

    :param parallelism: most tasks this executor holds at once (queued here, invoked or running).
    :param team_name: Airflow team whose configuration applies.
    :param clock: wall clock (tests pass a fake one); ``not_after`` is wall-clock time shared with the handler.
    :param clients: AWS clients to use instead of creating them at ``start()`` (tests, benchmarks).
    :param options: per-instance overrides of ``[lambda_executor]`` options (a routing policy's ``options``).
    """

    supports_multi_team: bool = True
    supports_callbacks: bool = False
    supports_connection_test: bool = False
    is_local: bool = False
    serve_logs: bool = False

    def __init__(
        self,
        parallelism: int = PARALLELISM,
        team_name: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        clients: AwsClients | None = None,
        **options: Any,
    ):
        super().__init__(parallelism=parallelism, team_name=team_name)
        check_option_names(options)  # names only: values are read and checked at start()
        self._options = dict(options)
        self._clock = clock
        self._config: LambdaExecutorConfig | None = None
        self._clients: AwsClients | None = clients
        self._pool: ThreadPoolExecutor | None = None
        self._readers: dict[str, QueueReader] = {}
        self._lock = threading.Lock()  # guards _by_dispatch and _retired against the reader threads
        self._dispatches: dict[TaskInstanceKey, Dispatch] = {}
        self._by_dispatch: dict[str, Dispatch] = {}
        self._retired: TTLCache[str, float] = TTLCache(RETIRED_DISPATCH_MAX, RETIRED_DISPATCH_TTL_S)
        self._inbound: deque[Received] = deque()
        self._acks_due = _Acks()
        self._infra_failures: dict[TaskInstanceKey, tuple[InfrastructureFailure, float]] = {}
        self._throttled_until = 0.0
        self._concurrency_limit: int | None = None
        self._function_timeout_s = LAMBDA_MAX_TIMEOUT_S
        self._started = False

    # -- configuration ---------------------------------------------------------------------------------------

    @property
    def config(self) -> LambdaExecutorConfig:
        """The parsed settings (parsed on first use, so constructing the executor never fails on them)."""
        if self._config is None:
            self._config = LambdaExecutorConfig.load(self.conf, self._options)
        return self._config

    @property
    def function_name(self) -> str:
        return self.config.function_name

    def _metric(self, name: str) -> str:
        return f"{METRIC_PREFIX}.{name}"

    def _tags(self) -> dict[str, str]:
        tags = {"function_name": self.config.function_name}
        if self.team_name:
            tags["team_name"] = self.team_name
        return tags

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the AWS clients, check the function and queues, start the invoke pool and the readers."""
        config = self.config
        self.log.info(
            "Starting LambdaExecutor for function %s%s (results %s, DLQ %s)",
            config.function_name,
            f":{config.qualifier}" if config.qualifier else "",
            config.results_queue_url,
            config.dead_letter_queue_url or "none",
        )
        if not config.dead_letter_queue_url:
            self.log.warning(
                "No dead_letter_queue_url: runs that Lambda kills (out of memory, crash) are only noticed by the "
                "watchdog after the function's timeout. Configure the function's DLQ and this option."
            )
        if self._clients is None:
            self._clients = make_clients(config)
        if config.check_health_on_startup:
            self.check_health()
        self._concurrency_limit = config.reserved_concurrency or self._discover_concurrency()
        self._pool = ThreadPoolExecutor(
            max_workers=config.max_invoke_workers, thread_name_prefix=f"lambda-invoke-{config.function_name}"
        )
        self._readers["results"] = self._make_reader("results", config.results_queue_url, self._sort_result)
        if config.dead_letter_queue_url:
            self._readers["dlq"] = self._make_reader(
                "dlq", config.dead_letter_queue_url, self._sort_dead_letter
            )
        for reader in self._readers.values():
            reader.start()
        self._started = True

    def _make_reader(self, name: str, url: str, sort: Callable[[QueueMessage], Disposition]) -> QueueReader:
        assert self._clients is not None
        return QueueReader(
            name=f"lambda-{name}-{self.config.function_name}",
            sqs=self._clients.sqs,
            queue_url=url,
            sort=sort,
            is_active=self._has_work_in_flight,
            wait_seconds=self.config.poll_wait_seconds,
            release_visibility_s=self.config.unowned_visibility_timeout,
        )

    def check_health(self) -> None:
        """Check that the function and the queues exist and are reachable; learn the function's limits."""
        assert self._clients is not None
        config = self.config
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs = {"FunctionName": config.function_name}
        if config.qualifier:
            kwargs["Qualifier"] = config.qualifier
        try:
            function = self._clients.lambda_.get_function(**kwargs).get("Configuration") or {}
        except (ClientError, BotoCoreError) as exc:
            raise LambdaHealthError(
                f"Lambda function {config.function_name!r} is not reachable: {protocol.scrub(str(exc))}. "
                "Check [lambda_executor] function_name, qualifier, region_name, lambda_endpoint_url and the "
                "credentials of aws_conn_id, or set check_health_on_startup = False."
            ) from None
        self._function_timeout_s = int(function.get("Timeout") or LAMBDA_MAX_TIMEOUT_S)
        self.log.info(
            "Lambda function %s: timeout %ss, memory %s MB",
            config.function_name,
            self._function_timeout_s,
            function.get("MemorySize", "?"),
        )
        for option in ("results_queue_url", "dead_letter_queue_url"):
            url = getattr(config, option)
            if not url:
                continue
            try:
                self._clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
            except (ClientError, BotoCoreError) as exc:
                raise LambdaHealthError(
                    f"SQS queue {url!r} ([lambda_executor] {option}) is not reachable: "
                    f"{protocol.scrub(str(exc))}. Check the URL, sqs_endpoint_url and the credentials."
                ) from None
        self._warn_about_async_retries()

    def _warn_about_async_retries(self) -> None:
        assert self._clients is not None
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs = {"FunctionName": self.config.function_name}
        if self.config.qualifier:
            kwargs["Qualifier"] = self.config.qualifier
        try:
            settings = self._clients.lambda_.get_function_event_invoke_config(**kwargs)
        except (ClientError, BotoCoreError):
            self.log.warning(
                "Could not read the function's event-invoke config: Lambda retries a failed async run twice by "
                "default. Set MaximumRetryAttempts = 0 so a dead run is reported (and can fall back) at once."
            )
            return
        retries = settings.get("MaximumRetryAttempts")
        if retries:
            self.log.warning(
                "Function %s has MaximumRetryAttempts = %s: Lambda re-runs a timed-out or crashed task itself "
                "before it reaches the DLQ. Set it to 0 (the router decides where a task runs again).",
                self.config.function_name,
                retries,
            )

    def _discover_concurrency(self) -> int:
        """The function's reserved concurrency, or this executor's parallelism when it has none."""
        assert self._clients is not None
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._clients.lambda_.get_function_concurrency(FunctionName=self.config.function_name)
        except (ClientError, BotoCoreError) as exc:
            self.log.warning(
                "Could not read the reserved concurrency of %s (%s); limiting in-flight runs to parallelism=%s",
                self.config.function_name,
                protocol.scrub(str(exc), 300),
                self.parallelism,
            )
            return self.parallelism
        reserved = response.get("ReservedConcurrentExecutions")
        return int(reserved) if reserved else self.parallelism

    def end(self) -> None:
        """Wait for the invokes in progress, then stop the readers (after deleting acknowledged messages)."""
        self.log.info("Ending LambdaExecutor for %s", self._config.function_name if self._config else "?")
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._collect_invokes(self._clock())
        # Only messages whose events the scheduler already took are deleted; the rest stay for the next owner.
        self._flush_acks()
        self._stop_readers(flush=True)
        self._started = False

    def terminate(self) -> None:
        """Stop now: cancel invokes not yet started (a running Lambda cannot be cancelled) and stop the readers."""
        self.log.warning("Terminating LambdaExecutor: invocations already accepted by Lambda keep running")
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._stop_readers(flush=False)
        self._started = False

    def _stop_readers(self, *, flush: bool) -> None:
        for reader in self._readers.values():
            reader.stop(flush=flush)
        self._readers.clear()

    # -- scheduler interface -----------------------------------------------------------------------------------

    def _process_workloads(self, workload_items: Sequence[workloads.All]) -> None:
        from airflow.executors import workloads as wl

        for workload in workload_items:
            if not isinstance(workload, wl.ExecuteTask):
                raise RuntimeError(
                    f"{type(self).__name__} cannot run workloads of type {type(workload).__name__}"
                )
            key = workload.ti.key
            self.queued_tasks.pop(key, None)
            dispatch = Dispatch(
                key=key, dispatch_id=uuid.uuid4().hex, workload_json=workload.model_dump_json()
            )
            dispatch.payload = self._seal(dispatch, self._clock())
            size = len(dispatch.payload.encode("utf-8"))
            if size > self.config.max_payload_bytes:
                reason = (
                    f"the Lambda invoke event for {key.dag_id}.{key.task_id} is {size} bytes, over "
                    f"max_payload_bytes={self.config.max_payload_bytes} (Lambda's async limit is 1 MiB): "
                    "make the task smaller (fewer or shorter rendered fields) or route it to another executor"
                )
                self.log.error("Not invoking %s: %s", key, reason)
                self.log_task_event(event="lambda payload too large", extra=reason, ti_key=key)
                self.fail(key, info=reason)
                continue
            self.running.add(key)
            self._register(dispatch)

    def sync(self) -> None:
        """Heartbeat work: collect invokes, apply delivered messages, run the watchdog, hand out invokes."""
        if not self._started:
            return
        now = self._clock()
        self._flush_acks()
        self._collect_invokes(now)
        self._apply_inbound(now)
        self._watchdog(now)
        self._drop_old_infra_failures(now)
        self._submit_due(now)
        self._save_task_event_logs()

    def revoke_task(self, *, ti: TaskInstance) -> None:
        """Forget a task. A Lambda run that already started cannot be cancelled; its results are ignored."""
        try:
            key = ti.key
            self.queued_tasks.pop(key, None)
            self.running.discard(key)
            dispatch = self._dispatches.get(key)
            if dispatch is None:
                return
            if dispatch.state in (DispatchState.ACCEPTED, DispatchState.STARTED):
                self.log.warning(
                    "Revoked %s, but Lambda cannot cancel an accepted invocation (request %s): it may still run; "
                    "its results will be ignored, and the handler will not start it after %s.",
                    key,
                    dispatch.request_id or "?",
                    time.strftime("%H:%M:%SZ", time.gmtime(dispatch.not_after)),
                )
            self._retire(dispatch)
        except Exception:
            self.log.exception("Could not revoke %s", getattr(ti, "key", ti))

    def try_adopt_task_instances(self, tis: Sequence[TaskInstance]) -> Sequence[TaskInstance]:
        """Adopt tasks whose external id names this function: watch the queues for their dispatches again."""
        not_adopted: list[TaskInstance] = []
        now = self._clock()
        for ti in tis:
            parsed = parse_lambda_external_id(ti.external_executor_id)
            if parsed is None or parsed[0] != self.config.function_name:
                not_adopted.append(ti)
                continue
            _, request_id, dispatch_id = parsed
            started = ti.state == TaskInstanceState.RUNNING
            dispatch = Dispatch(
                key=ti.key,
                dispatch_id=dispatch_id,
                workload_json=None,
                state=DispatchState.STARTED if started else DispatchState.ACCEPTED,
                request_id=request_id,
                # The original times are unknown here: count from now, which only makes the watchdog later.
                issued_at=now,
                not_after=now + self.config.event_max_age_seconds,
                started_at=now if started else None,
            )
            self.running.add(ti.key)
            self._register(dispatch)
            self.log.info("Adopted %s (dispatch %s, request %s)", ti.key, dispatch_id, request_id or "?")
        if len(not_adopted) < len(tis):
            self._stats_incr("adopted", len(tis) - len(not_adopted))
        return not_adopted

    # -- child-executor interface (hybrid_router.child_protocol) -----------------------------------------------

    def free_capacity(self) -> int:
        """How many more tasks this executor can start now: 0 while Lambda is throttling it."""
        if self._clock() < self._throttled_until:
            return 0
        limit = min(self._concurrency_limit or self.parallelism, self.parallelism)
        return max(0, limit - len(self._dispatches) - len(self.queued_tasks))

    def pop_infrastructure_failure(self, key: TaskInstanceKey) -> InfrastructureFailure | None:
        entry = self._infra_failures.pop(key, None)
        return entry[0] if entry else None

    # -- task logs ---------------------------------------------------------------------------------------------

    def get_task_log(self, ti: TaskInstance, try_number: int) -> tuple[list[str], list[str]]:
        """Where the Lambda run's own log is, and its lines when they can be read.

        The task's Airflow log (written by the task runner inside Lambda to ``log_path``) is shown by Airflow
        itself; this adds the function's log for the run: its lines between ``START RequestId`` and ``END
        RequestId`` from the local service's log files (``local_log_dir``), or the lines CloudWatch Logs has
        for the request id on real AWS. Called by the API server on an executor that was never started, so it
        relies only on the task's external id and the configuration, and never raises.
        """
        parsed = parse_lambda_external_id(getattr(ti, "external_executor_id", None))
        if parsed is None:
            return [], []
        function_name, request_id, dispatch_id = parsed
        short_name = function_name.rsplit(":function:", 1)[-1].split(":", 1)[0]
        try:
            config = self.config
        except LambdaConfigError as exc:
            return [f"AWS Lambda {function_name}: request {request_id or '?'}"], [f"({exc})"]
        if config.local_log_dir:
            where = f"local Lambda log folder {config.local_log_dir}/{short_name}"
        else:
            where = f"CloudWatch Logs group /aws/lambda/{short_name}"
        sources = [
            f"AWS Lambda {function_name}: request {request_id or '?'} (dispatch {dispatch_id}), {where}"
        ]
        if not request_id:
            return sources, []
        try:
            if config.local_log_dir:
                lines = local_invocation_log(Path(config.local_log_dir) / short_name, request_id)
            elif config.lambda_endpoint_url:
                return sources, []  # a non-AWS endpoint without a log folder: nothing more to read
            else:
                lines = self._cloudwatch_lines(f"/aws/lambda/{short_name}", request_id)
        except Exception as exc:
            return sources, [f"(the Lambda log could not be read: {protocol.scrub(str(exc), 300)})"]
        return sources, lines

    def _cloudwatch_lines(self, group: str, request_id: str, limit: int = 1000) -> list[str]:
        import boto3
        from botocore.config import Config

        # The API server calls this while rendering a page: fail fast rather than retry.
        kwargs: dict[str, Any] = {
            "config": Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5)
        }
        if self.config.region_name:
            kwargs["region_name"] = self.config.region_name
        logs = boto3.client("logs", **kwargs)
        response = logs.filter_log_events(logGroupName=group, filterPattern=f'"{request_id}"', limit=limit)
        return [
            protocol.scrub(str(event.get("message", "")).rstrip("\n")) for event in response.get("events", [])
        ]

    # -- dispatch bookkeeping ----------------------------------------------------------------------------------

    def _register(self, dispatch: Dispatch) -> None:
        with self._lock:
            previous = self._dispatches.get(dispatch.key)
            if previous is not None:
                self._retire_locked(previous)
            self._dispatches[dispatch.key] = dispatch
            self._by_dispatch[dispatch.dispatch_id] = dispatch
        for reader in self._readers.values():
            reader.wake()

    def _retire(self, dispatch: Dispatch) -> None:
        with self._lock:
            self._retire_locked(dispatch)

    def _retire_locked(self, dispatch: Dispatch) -> None:
        self._by_dispatch.pop(dispatch.dispatch_id, None)
        if dispatch.future is not None:
            dispatch.future.cancel()
        if self._dispatches.get(dispatch.key) is dispatch:
            del self._dispatches[dispatch.key]
        self._retired[dispatch.dispatch_id] = self._clock()

    def _has_work_in_flight(self) -> bool:
        return bool(self._by_dispatch)

    def _seal(self, dispatch: Dispatch, now: float) -> str:
        """The signed event for the next invoke of ``dispatch``; ``not_after`` counts from this attempt."""
        assert dispatch.workload_json is not None
        dispatch.issued_at = now
        dispatch.not_after = now + self.config.event_max_age_seconds
        key = dispatch.key
        event = InvokeEvent(
            dispatch_id=dispatch.dispatch_id,
            task=TaskRef(key.dag_id, key.task_id, key.run_id, key.try_number, key.map_index),
            workload=dispatch.workload_json,
            results_queue_url=self.config.results_queue_url,
            issued_at=now,
            not_after=dispatch.not_after,
        )
        return protocol.seal_event(event, self.config.secret)

    # -- invoking ----------------------------------------------------------------------------------------------

    def _submit_due(self, now: float) -> None:
        if now < self._throttled_until or self._pool is None:
            return
        limit = self._concurrency_limit or self.parallelism
        in_flight = sum(1 for d in self._dispatches.values() if d.state in IN_FLIGHT)
        for dispatch in list(self._dispatches.values()):
            if in_flight >= limit:
                break
            if dispatch.state is not DispatchState.PENDING or dispatch.next_attempt_at > now:
                continue
            # An event sealed moments ago (when the task arrived, usually in this heartbeat) goes as it is; one
            # that waited for a slot or a back-off is sealed again, so not_after counts from this invoke.
            fresh = dispatch.payload and now - dispatch.issued_at < PRESEALED_MAX_AGE_S
            payload = dispatch.payload if fresh else self._seal(dispatch, now)
            dispatch.payload = ""
            dispatch.state = DispatchState.INVOKING
            dispatch.attempts += 1
            dispatch.future = self._pool.submit(self._invoke, payload)
            in_flight += 1

    def _invoke(self, payload: str) -> str | InvokeError:
        """Runs in a pool thread: one async invoke. Returns the request id, or the classified error."""
        assert self._clients is not None
        kwargs: dict[str, Any] = {
            "FunctionName": self.config.function_name,
            "InvocationType": "Event",
            "Payload": payload.encode("utf-8"),
        }
        if self.config.qualifier:
            kwargs["Qualifier"] = self.config.qualifier
        try:
            response = self._clients.lambda_.invoke(**kwargs)
        except Exception as exc:
            return classify_invoke_error(exc)
        return invoke_request_id(response)

    def _collect_invokes(self, now: float) -> None:
        for dispatch in list(self._dispatches.values()):
            future = dispatch.future
            if future is None or not future.done():
                continue
            dispatch.future = None
            if future.cancelled():
                dispatch.state = DispatchState.PENDING
                continue
            outcome = future.result()
            if isinstance(outcome, InvokeError):
                # A run that already reported STARTED was accepted after all (a 5xx can hide an accepted
                # invoke): invoking it again would start a second run.
                if dispatch.state is DispatchState.INVOKING:
                    self._invoke_refused(dispatch, outcome, now)
                continue
            self._stats_incr("invoke")
            dispatch.first_refused_at = None
            dispatch.request_id = dispatch.request_id or outcome
            if dispatch.state is not DispatchState.INVOKING:
                continue  # the handler's STARTED message overtook the invoke's answer
            dispatch.state = DispatchState.ACCEPTED
            # A QUEUED event records the external id now, so a scheduler restart can adopt the task.
            self.change_state(
                dispatch.key,
                TaskInstanceState.QUEUED,
                lambda_external_id(self.config.function_name, outcome, dispatch.dispatch_id),
                remove_running=False,
            )

    def _invoke_refused(self, dispatch: Dispatch, error: InvokeError, now: float) -> None:
        key = dispatch.key
        if error.kind is InvokeErrorKind.REJECTED:
            reason = f"Lambda refused the invocation: {error.code}: {protocol.scrub(error.message, 500)}"
            self.log.error("Task %s failed: %s", key, reason)
            self._stats_incr("invoke_rejected")
            self.log_task_event(event="lambda invoke rejected", extra=reason, ti_key=key)
            self._finish(dispatch, TaskInstanceState.FAILED, reason)
            return
        throttled = error.kind is InvokeErrorKind.THROTTLED
        self._stats_incr("throttled" if throttled else "invoke_error")
        if dispatch.first_refused_at is None:
            dispatch.first_refused_at = now
        # A 429 means Lambda did not take the event; a 5xx or a lost answer may hide an accepted one.
        dispatch.maybe_accepted |= not throttled
        dispatch.last_refusal = f"{error.code}: {protocol.scrub(error.message, 300)}"
        waited = now - dispatch.first_refused_at
        if waited >= self.config.throttle_backoff_max:
            detail = f"Lambda refused the invocation for {waited:.0f}s; last answer {dispatch.last_refusal}"
            if dispatch.maybe_accepted:
                # An event Lambda may have accepted could still start this try until its not_after: running the
                # same try elsewhere is not safe, so the try fails and Airflow's retries (new tokens) apply.
                self.log.error("Task %s failed: %s", key, detail)
                self.log_task_event(event="lambda invoke failed", extra=detail, ti_key=key)
                self._finish(dispatch, TaskInstanceState.FAILED, detail)
            else:
                # Only 429s: the task never started, so another executor can run the same try.
                self._infrastructure_failure(dispatch, Outcome.THROTTLED, detail)
            return
        delay = _backoff_delay(dispatch.attempts, self.config.throttle_backoff_max)
        dispatch.state = DispatchState.PENDING
        dispatch.next_attempt_at = now + delay
        if throttled:
            self._throttled_until = max(self._throttled_until, now + delay)
        self.log.info(
            "Invoke of %s %s (%s); retrying in %.1fs",
            key,
            "throttled" if throttled else "failed",
            dispatch.last_refusal,
            delay,
        )

    # -- results -----------------------------------------------------------------------------------------------

    def _sort_result(self, message: QueueMessage) -> Disposition:
        """Reader thread: check a results-queue message and hand it over if this executor owns it."""
        try:
            result = protocol.open_result(message.body, self.config.secret, now=self._clock())
        except protocol.MessageError as exc:
            self._malformed("results", message, exc)
            return Disposition.DELETE
        # A SUCCESS is already in Airflow's database: the task process recorded it through the execution API
        # before it exited 0. A scheduler that dies before taking this event finds the task finished (it is
        # not adopted), so the message need not wait a heartbeat for the acknowledgement. Deleting it at once
        # keeps the queue short; moto's receive (and SQS's) costs grow with the messages in flight.
        settled = result.phase is Phase.FINISHED and result.outcome is Outcome.SUCCESS
        return self._sort_owned(
            message,
            result.dispatch_id,
            "results",
            Received(
                receipt_handle=message.receipt_handle,
                dispatch_id=result.dispatch_id,
                result=result,
                needs_ack=not settled,
            ),
        )

    def _sort_dead_letter(self, message: QueueMessage) -> Disposition:
        """Reader thread: a DLQ message's body is the event we sent; its attributes say what killed the run."""
        try:
            event = protocol.open_event(message.body, self.config.secret)
        except protocol.MessageError as exc:
            self._malformed("dlq", message, exc)
            return Disposition.DELETE
        code = message.attributes.get("ErrorCode", "")
        text = message.attributes.get("ErrorMessage", "")
        outcome = classify_dead_letter(code, text)
        detail = protocol.scrub(
            f"{text} (ErrorCode {code})" if code else text or "dead-lettered by Lambda", 500
        )
        return self._sort_owned(
            message,
            event.dispatch_id,
            "dlq",
            Received(
                receipt_handle=message.receipt_handle,
                dispatch_id=event.dispatch_id,
                dead_letter=(outcome, detail, message.attributes.get("RequestID", "")),
                queue="dlq",
            ),
        )

    def _sort_owned(self, message: QueueMessage, dispatch_id: str, queue: str, item: Received) -> Disposition:
        with self._lock:
            owned = dispatch_id in self._by_dispatch
            retired = dispatch_id in self._retired
        if owned:
            self._inbound.append(item)
            return Disposition.DELIVER if item.needs_ack else Disposition.DELIVER_AND_DELETE
        if retired:
            self.log.debug("Deleting a %s message for finished dispatch %s", queue, dispatch_id)
            return Disposition.DELETE
        if message.receive_count >= self.config.stale_after_sightings:
            self.log.warning(
                "Deleting %s message %s for dispatch %s: no executor claimed it in %d receives",
                queue,
                message.message_id,
                dispatch_id,
                message.receive_count,
            )
            self._stats_incr("stale_message")
            return Disposition.DELETE
        return Disposition.RELEASE

    def _malformed(self, queue: str, message: QueueMessage, exc: Exception) -> None:
        # Deleted right after this, so each bad message is logged once. The body may hold a token: never log it.
        self.log.warning(
            "Deleting a %s message %s that changes no task: %s",
            queue,
            message.message_id,
            protocol.scrub(str(exc)),
        )
        self._stats_incr("malformed_message")

    def _apply_inbound(self, now: float) -> None:
        while self._inbound:
            item = self._inbound.popleft()
            if item.needs_ack:
                acks = self._acks_due.dead_letters if item.queue == "dlq" else self._acks_due.results
                acks.append(item.receipt_handle)
            dispatch = self._by_dispatch.get(item.dispatch_id)
            if dispatch is None:
                continue  # revoked or finished since the reader delivered it
            if item.dead_letter is not None:
                outcome, detail, request_id = item.dead_letter
                if request_id and not dispatch.request_id:
                    dispatch.request_id = request_id
                self._infrastructure_failure(dispatch, outcome, detail)
            elif item.result is not None:
                self._apply_result(dispatch, item.result, now)

    def _apply_result(self, dispatch: Dispatch, result: ResultMessage, now: float) -> None:
        if result.request_id:
            dispatch.request_id = result.request_id
        if result.phase is Phase.STARTED:
            if dispatch.state is DispatchState.STARTED:
                return  # Lambda retried the event: the first run is dead and this one started again
            self._mark_started(dispatch, result)
            return
        if dispatch.state is not DispatchState.STARTED and result.outcome is not Outcome.EVENT_EXPIRED:
            # A run shorter than the handler's STARTED grace sends FINISHED alone: it started all the same.
            self._mark_started(dispatch, result)
        self._stats_timing("result_latency", max(0.0, now - dispatch.issued_at))
        outcome = result.outcome
        assert outcome is not None  # the protocol guarantees it for FINISHED
        if outcome is Outcome.SUCCESS:
            self._finish(dispatch, TaskInstanceState.SUCCESS, None)
        elif outcome is Outcome.FAILED:
            detail = f"task failed on Lambda (return code {result.return_code})"
            self._finish(dispatch, TaskInstanceState.FAILED, detail)
        else:
            self._infrastructure_failure(dispatch, outcome, result.detail or outcome.value)

    def _mark_started(self, dispatch: Dispatch, result: ResultMessage) -> None:
        dispatch.state = DispatchState.STARTED
        dispatch.started_at = result.started_at or result.sent_at
        self._stats_timing("start_latency", max(0.0, dispatch.started_at - dispatch.issued_at))
        self.running_state(
            dispatch.key,
            lambda_external_id(self.config.function_name, dispatch.request_id, dispatch.dispatch_id),
        )

    def _infrastructure_failure(self, dispatch: Dispatch, outcome: Outcome, detail: str) -> None:
        key = dispatch.key
        detail = protocol.scrub(detail, 500)
        failure = InfrastructureFailure(
            reason=outcome.value, detail=detail, executor=f"lambda:{self.config.function_name}"
        )
        self._infra_failures[key] = (failure, self._clock())
        info = f"lambda infrastructure failure: {outcome.value}: {detail}"
        self.log.warning("Task %s: %s (request %s)", key, info, dispatch.request_id or "?")
        self._stats_incr(f"infra_failure.{outcome.value}")
        self.log_task_event(event=f"lambda {outcome.value}", extra=info, ti_key=key)
        self._finish(dispatch, TaskInstanceState.FAILED, info)

    def _finish(self, dispatch: Dispatch, state: TaskInstanceState, info: str | None) -> None:
        self._retire(dispatch)
        self.change_state(dispatch.key, state, info)

    def _flush_acks(self) -> None:
        """Let the readers delete messages whose events the scheduler has taken since the last heartbeat."""
        due, self._acks_due = self._acks_due, _Acks()
        if "results" in self._readers:
            self._readers["results"].ack(due.results)
        if "dlq" in self._readers:
            self._readers["dlq"].ack(due.dead_letters)

    # -- watchdog ----------------------------------------------------------------------------------------------

    def _watchdog(self, now: float) -> None:
        """Declare dead the runs that can no longer report: nothing else would ever free their slot."""
        for dispatch in list(self._dispatches.values()):
            if dispatch.state is DispatchState.ACCEPTED and now > dispatch.not_after + WATCHDOG_GRACE_S:
                self._infrastructure_failure(
                    dispatch,
                    Outcome.EVENT_EXPIRED,
                    "no run started before the event's not_after; the handler refuses it from then on",
                )
            elif dispatch.state is DispatchState.STARTED and dispatch.started_at is not None:
                dead_after = max(dispatch.started_at + self._function_timeout_s, dispatch.not_after)
                if now > dead_after + WATCHDOG_GRACE_S:
                    self._infrastructure_failure(
                        dispatch,
                        Outcome.TIMEOUT,
                        f"no result {now - dispatch.started_at:.0f}s after the run started "
                        f"(function timeout {self._function_timeout_s}s)",
                    )

    def _drop_old_infra_failures(self, now: float) -> None:
        for key, (_, recorded) in list(self._infra_failures.items()):
            if now - recorded > INFRA_FAILURE_TTL_S:
                del self._infra_failures[key]

    def _save_task_event_logs(self) -> None:
        """Write this executor's task events to Airflow's ``log`` table itself, when a scheduler drives it.

        Airflow 3.3.2's scheduler saves ``_task_event_logs`` with ``bulk_save_objects(preserve_order=False)``
        over a generator, which inserts empty rows ("NOT NULL constraint failed: log.event") and loses them.
        Without a scheduler (``job_id`` unset: tests, benchmarks) the events stay in ``_task_event_logs``.
        """
        if self.job_id is None or not self._task_event_logs:
            return
        from airflow.utils.session import create_session

        rows = list(self._task_event_logs)
        try:
            # Its own short transaction: never commit or roll back the scheduler's session.
            with create_session(scoped=False) as session:
                session.add_all(rows)
        except Exception:
            self.log.exception("Could not write %d Lambda task events to the log table; retrying", len(rows))
            return
        for _ in rows:
            self._task_event_logs.popleft()

    # -- metrics -----------------------------------------------------------------------------------------------

    def _stats_incr(self, name: str, count: int = 1) -> None:
        from airflow.sdk.observability.stats import Stats

        Stats.incr(self._metric(name), count, tags=self._tags())

    def _stats_timing(self, name: str, seconds: float) -> None:
        from airflow.sdk.observability.stats import Stats

        Stats.timing(self._metric(name), seconds * 1000.0, tags=self._tags())


def local_invocation_log(folder: Path, request_id: str, max_lines: int = 5000) -> list[str]:
    """One invocation's lines from the local service's log streams (``START RequestId`` to ``REPORT``)."""
    start_marker = f"START RequestId: {request_id}"
    end_marker = f"REPORT RequestId: {request_id}"
    for stream in sorted(folder.glob("*.log")):
        lines: list[str] = []
        with stream.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not lines and not line.startswith(start_marker):
                    continue
                lines.append(protocol.scrub(line.rstrip("\n")))
                if line.startswith(end_marker) or len(lines) >= max_lines:
                    return lines
        if lines:
            return lines  # the run is still going: what it wrote so far
    return []


def _backoff_delay(attempt: int, cap: float) -> float:
    """Jittered exponential back-off for the ``attempt``-th refused invoke (tenacity's strategy, not our own)."""
    from tenacity import RetryCallState, wait_exponential_jitter

    wait = wait_exponential_jitter(
        multiplier=BACKOFF_INITIAL_S, max=min(cap, BACKOFF_CAP_S), jitter=BACKOFF_JITTER_S
    )
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait(state))


__all__ = [
    "LambdaConfigError",
    "LambdaExecutor",
    "LambdaHealthError",
]

"""``LambdaExecutor``: runs Airflow tasks as asynchronous AWS Lambda invocations.

The scheduler thread signs one event per task try (a dispatch, ``dispatch.py``) and a thread pool invokes the
function with it, keeping at most the function's concurrency in flight; reader threads (``inbox.py``) keep the
handler's signed results and the DLQ's dead letters until each heartbeat applies them, and the one that delivers
a run's end invokes the next task waiting for a slot at once (``standby.py``). Every AWS call goes through
``aws.py``; the run's own log is read by ``task_logs.py``. What happens to a task, and the fencing that keeps an
old run from acting after its task moved elsewhere, are described in docs/lambda.md.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from airflow.executors.base_executor import PARALLELISM, BaseExecutor
from airflow.utils.state import TaskInstanceState

from hybrid_router.child_protocol import (
    FunctionLimits,
    InfrastructureFailure,
    RunMeasurement,
    SharedConcurrency,
)
from hybrid_router.lambda_exec import aws, capacity, liveness, measurements, protocol, runs
from hybrid_router.lambda_exec.aws import (
    AwsCallError,
    AwsClients,
    AwsError,
    AwsErrorKind,
    InvokeAccepted,
    make_clients,
)
from hybrid_router.lambda_exec.config import (
    LAMBDA_MAX_TIMEOUT_S,
    LambdaConfigError,
    LambdaExecutorConfig,
    check_option_names,
)
from hybrid_router.lambda_exec.dispatch import (
    IN_FLIGHT,
    Dispatch,
    DispatchBook,
    DispatchState,
    backoff_delay,
)
from hybrid_router.lambda_exec.external_id import lambda_external_id, parse_lambda_external_id
from hybrid_router.lambda_exec.inbox import Inbox, Reads
from hybrid_router.lambda_exec.protocol import (
    UNCLAIMED_OUTCOMES,
    InvokeEvent,
    Outcome,
    Phase,
    ResultMessage,
    TaskRef,
)
from hybrid_router.lambda_exec.shared_readers import SharedQueues
from hybrid_router.lambda_exec.standby import Standby
from hybrid_router.lambda_exec.task_logs import RunLogReader

if TYPE_CHECKING:
    from airflow.executors import workloads
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancekey import TaskInstanceKey

METRIC_PREFIX = "lambda_executor"
# How old an event sealed at queue time may be and still be sent as it is.
PRESEALED_MAX_AGE_S = 1.0
# How old the sealed event of a task waiting for a slot may be and still be sent as it is when a run ends
# (``standby``); older ones are sealed again at a heartbeat. Its not_after counts from its sealing, as the handler
# and the watchdog both see it.
STANDBY_RESEAL_S = 30.0
# Infrastructure failures nobody popped (no router) are dropped after this long.
INFRA_FAILURE_TTL_S = 3600.0
# Reasons of the infrastructure failures of an invoke Lambda certainly refused (beside ``Outcome.THROTTLED``):
# the try never started, so another executor may run it. Not run outcomes: the handler never reports them.
REASON_CREDENTIALS = "credentials"
REASON_INVOKE_REJECTED = "invoke_rejected"
# An invoke answer that is tried again after a back-off: its metric, and the word for it in the log.
_RETRIED_ANSWERS = {
    AwsErrorKind.THROTTLED: ("throttled", "throttled"),
    AwsErrorKind.CREDENTIALS: ("invoke_credentials_refused", "refused for its credentials"),
    AwsErrorKind.RETRYABLE: ("invoke_error", "failed"),
}


class LambdaHealthError(RuntimeError):
    """The function or a queue is unreachable at start; the message says what to check."""


class LambdaExecutor(BaseExecutor):
    """Runs each task as an asynchronous invocation of one AWS Lambda function.

    :param parallelism: most tasks this executor holds at once (queued here, invoked or running).
    :param team_name: Airflow team whose configuration applies.
    :param clock: wall clock (tests pass a fake one); ``not_after`` is wall-clock time shared with the handler.
    :param clients: AWS clients to use instead of creating them at ``start()`` (tests, benchmarks).
    :param queues: the readers shared by the executors of one scheduler (default: this process's); tests pass
        their own to model executors in two schedulers.
    :param options: per-instance overrides of ``[lambda_executor]`` options (a routing policy's ``options``).
    """

    supports_multi_team: bool = True
    supports_callbacks: bool = False
    supports_connection_test: bool = False
    is_local: bool = False
    # A task it holds past the function's concurrency is invoked the moment one of its runs reports its end
    # (``standby``): a router may hold tasks in it (``prefetch``) to hide the scheduler loop's latency.
    fills_freed_slots_at_once: bool = True
    serve_logs: bool = False

    def __init__(
        self,
        parallelism: int = PARALLELISM,
        team_name: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        clients: AwsClients | None = None,
        queues: SharedQueues | None = None,
        **options: Any,
    ):
        super().__init__(parallelism=parallelism, team_name=team_name)
        check_option_names(options)  # names only: values are read and checked at start()
        self._options = dict(options)
        self._clock = clock
        self._config: LambdaExecutorConfig | None = None
        self._clients: AwsClients | None = clients
        self._own_clients = clients is None
        self._pool: ThreadPoolExecutor | None = None
        self._dispatches = DispatchBook(clock, on_retire=lambda d: self._standby.withdraw(d.dispatch_id))
        self._standby = Standby(self._launch_invoke, clock=clock, max_age_s=STANDBY_RESEAL_S)
        self._inbox = Inbox(
            self._dispatches,
            clock=clock,
            stats_incr=self._stats_incr,
            queues=queues,
            on_run_end=self._run_ended,
        )
        self._infra_failures: dict[TaskInstanceKey, tuple[InfrastructureFailure, float]] = {}
        self._measurements = measurements.RunMeasurements(clock)
        # No invokes and no free capacity until then: Lambda throttles this executor or refuses its credentials.
        self._paused_until = 0.0
        self._concurrency_limit: int | None = None
        # Runs of the function other schedulers have in flight, as the router last counted them (``capacity``).
        self._others_in_flight = 0
        # Most runs at once when that is less than parallelism: a router's child holds its prefetch beyond it.
        self.max_in_flight: int | None = None
        self._function_timeout_s = LAMBDA_MAX_TIMEOUT_S
        # The function's memory size and timeout, once ``check_health`` described it.
        self.function_limits: FunctionLimits | None = None
        self._run_logs = RunLogReader(lambda: self.config)
        self._started = False
        # Heartbeats counted, and the final states held back one heartbeat so that the RUNNING event (which
        # carries the run's external id) reaches the scheduler first: its event buffer keeps one event per task.
        self._beat = 0
        self._held_finals: list[tuple[TaskInstanceKey, TaskInstanceState, str | None]] = []

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
                "No dead_letter_queue_url: runs that Lambda kills (out of memory, crash) are only noticed once "
                "their heartbeat stops, or after the function's timeout. Configure the function's DLQ and this option."
            )
        if self._own_clients:
            # Every start resolves the credentials again: a client keeps those it found when it was made (none
            # after a start that failed for want of them, and the router retries start()).
            for client in self._clients.all if self._clients else ():
                client.close()
            self._clients = make_clients(config)
        if config.check_health_on_startup:
            self.check_health()
        self._concurrency_limit = config.reserved_concurrency or self._discover_concurrency()
        self._pool = ThreadPoolExecutor(
            max_workers=config.max_invoke_workers, thread_name_prefix=f"lambda-invoke-{config.function_name}"
        )
        self._inbox.start(config, self._clients.sqs)
        self._started = True

    def check_health(self) -> None:
        """Check that the function and the queues are reachable; learn the function's timeout."""
        assert self._clients is not None
        config = self.config
        try:
            function = aws.describe_function(self._clients.lambda_, config.function_name, config.qualifier)
        except AwsCallError as exc:
            raise LambdaHealthError(
                f"Lambda function {config.function_name!r} is not reachable: {protocol.scrub(str(exc.error))}. "
                "Check [lambda_executor] function_name, qualifier, region_name, lambda_endpoint_url and the "
                "credentials of aws_conn_id, or set check_health_on_startup = False."
            ) from None
        self._function_timeout_s = function.timeout_s or LAMBDA_MAX_TIMEOUT_S
        self._measurements.memory_size_mb = function.memory_mb
        self.function_limits = FunctionLimits(memory_mb=function.memory_mb, timeout_s=function.timeout_s)
        self.log.info(
            "Lambda function %s: timeout %ss, memory %s MB",
            config.function_name,
            self._function_timeout_s,
            function.memory_mb or "?",
        )
        for option in ("results_queue_url", "dead_letter_queue_url"):
            url = getattr(config, option)
            if not url:
                continue
            try:
                aws.check_queue(self._clients.sqs, url)
            except AwsCallError as exc:
                raise LambdaHealthError(
                    f"SQS queue {url!r} ([lambda_executor] {option}) is not reachable: "
                    f"{protocol.scrub(str(exc.error))}. Check the URL, sqs_endpoint_url and the credentials."
                ) from None
        self._warn_about_async_retries()

    def _warn_about_async_retries(self) -> None:
        assert self._clients is not None
        try:
            settings = aws.event_invoke_settings(
                self._clients.lambda_, self.config.function_name, self.config.qualifier
            )
        except AwsCallError:
            self.log.warning(
                "Could not read the function's event-invoke config: Lambda retries a failed async run twice by "
                "default. Set MaximumRetryAttempts = 0 so a dead run is reported (and can fall back) at once."
            )
            return
        if settings.maximum_retry_attempts:
            self.log.warning(
                "Function %s has MaximumRetryAttempts = %s: Lambda re-runs a timed-out or crashed task itself "
                "before it reaches the DLQ. Set it to 0 (the router decides where a task runs again).",
                self.config.function_name,
                settings.maximum_retry_attempts,
            )

    def _discover_concurrency(self) -> int | None:
        """The function's reserved concurrency; None without one (runs are then bounded by parallelism)."""
        assert self._clients is not None
        try:
            reserved = aws.reserved_concurrency(self._clients.lambda_, self.config.function_name)
        except AwsCallError as exc:
            self.log.warning(
                "Could not read the reserved concurrency of %s (%s); limiting in-flight runs to parallelism=%s",
                self.config.function_name,
                protocol.scrub(str(exc.error), 300),
                self.parallelism,
            )
            return None
        return reserved

    def end(self) -> None:
        """Wait for the invokes in progress, then stop the readers (after deleting acknowledged messages)."""
        self.log.info("Ending LambdaExecutor for %s", self._config.function_name if self._config else "?")
        self._standby.clear()  # the tasks still waiting for a slot stay for the scheduler's next owner
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            with self._standby.held() as standby:
                self._take_launched(standby.take_launched())
            self._collect_invokes(self._clock())
        self._release_held_finals()
        # Only messages whose events the scheduler already took are deleted; the rest stay for the next owner.
        self._inbox.stop(flush=True)
        self._started = False

    def terminate(self) -> None:
        """Stop now: cancel invokes not yet started (a running Lambda cannot be cancelled) and stop the readers."""
        self.log.warning("Terminating LambdaExecutor: invocations already accepted by Lambda keep running")
        self._standby.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._inbox.stop(flush=False)
        self._started = False

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
            # The dispatch id reaches the database in the loop that sends the invoke, not one heartbeat after
            # Lambda's answer: a scheduler dying in between leaves its successor an id to adopt the run by.
            self.change_state(
                key,
                TaskInstanceState.QUEUED,
                lambda_external_id(self.config.function_name, "", dispatch.dispatch_id),
                remove_running=False,
            )

    def sync(self) -> None:
        """Heartbeat work: collect invokes, apply delivered messages, run the watchdog, hand out invokes."""
        if not self._started:
            return
        now = self._clock()
        self._beat += 1
        self._release_held_finals()
        with self._standby.held() as standby:
            self._take_launched(standby.take_launched())
        # Read before the messages are taken: a receive that worked by then delivered what it received.
        reads = self._inbox.reads()
        self._inbox.flush_acks()
        self._collect_invokes(now)
        self._apply_inbound(now)
        self._watchdog(now, reads)
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
            self._dispatches.retire(dispatch)
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
            request_id, dispatch_id = parsed.request_id, parsed.dispatch_id
            started = ti.state == TaskInstanceState.RUNNING
            if not request_id and not started:
                # Recorded before its invoke, never known accepted nor claimed: it may never have been sent,
                # and no run would ever report. Airflow resets it; a copy that was sent finds its try gone.
                not_adopted.append(ti)
                continue
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
                # The run that held the task, when the id names it; otherwise the first run that claims.
                run_id=parsed.run_id or None,
            )
            self.running.add(ti.key)
            self._register(dispatch)
            self.log.info("Adopted %s (dispatch %s, request %s)", ti.key, dispatch_id, request_id or "?")
        if len(not_adopted) < len(tis):
            self._stats_incr("adopted", len(tis) - len(not_adopted))
        return not_adopted

    # -- child-executor interface (hybrid_router.child_protocol) -----------------------------------------------

    def free_capacity(self) -> int:
        """How many more tasks this executor can start now: 0 while Lambda throttles it or refuses its credentials."""
        if self._clock() < self._paused_until:
            return 0
        limit = min(self._concurrency_limit or self.parallelism, self.max_in_flight or self.parallelism)
        return max(0, limit - len(self._dispatches) - len(self.queued_tasks))

    def shared_concurrency(self) -> SharedConcurrency | None:
        """The function's concurrency limit, shared with every other scheduler's executors (``capacity.py``)."""
        return capacity.shared_concurrency(self.config.function_name, self._concurrency_limit)

    def note_others_in_flight(self, count: int) -> None:
        """Other schedulers' runs of the function, as the router counted them: this executor invokes a task it
        holds only while the function has a slot left by them too."""
        self._others_in_flight = max(0, int(count))

    def pop_infrastructure_failure(self, key: TaskInstanceKey) -> InfrastructureFailure | None:
        entry = self._infra_failures.pop(key, None)
        return entry[0] if entry else None

    def pop_run_measurement(self, key: TaskInstanceKey) -> RunMeasurement | None:
        return self._measurements.pop(key)

    # -- task logs ---------------------------------------------------------------------------------------------

    def get_task_log(self, ti: TaskInstance, try_number: int) -> tuple[list[str], list[str]]:
        """Where the Lambda run's own log is, and its lines when they can be read; never raises."""
        return self._run_logs.read(getattr(ti, "external_executor_id", None))

    # -- dispatch bookkeeping ----------------------------------------------------------------------------------

    def _register(self, dispatch: Dispatch) -> None:
        self._dispatches.register(dispatch)
        self._inbox.wake(dispatch.dispatch_id)  # an adopted dispatch's hidden results are shown at once

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
            **liveness.event_lease(self.config.run_heartbeat_seconds),
        )
        return protocol.seal_event(event, self.config.secret)

    # -- invoking ----------------------------------------------------------------------------------------------

    def _submit_due(self, now: float) -> None:
        if self._pool is None or self._clients is None:
            return
        with self._standby.held() as standby:
            self._take_launched(standby.take_launched())
            if now < self._paused_until:
                # Nothing goes while Lambda throttles this executor or refuses its credentials.
                standby.refill(())
                return
            limit = min(self._concurrency_limit or self.parallelism, self.max_in_flight or self.parallelism)
            limit = max(0, limit - self._others_in_flight)
            in_flight = sum(1 for d in self._dispatches.values() if d.state in IN_FLIGHT)
            waiting: list[Dispatch] = []
            for dispatch in list(self._dispatches.values()):
                if dispatch.state is not DispatchState.PENDING or dispatch.next_attempt_at > now:
                    continue
                if in_flight >= limit:
                    waiting.append(dispatch)
                    continue
                # An event sealed moments ago (when the task arrived, usually in this heartbeat) goes as it is;
                # one that waited for a slot or a back-off is sealed again, so not_after counts from this invoke.
                fresh = dispatch.payload and now - dispatch.issued_at < PRESEALED_MAX_AGE_S
                payload = dispatch.payload if fresh else self._seal(dispatch, now)
                dispatch.payload = ""
                dispatch.state = DispatchState.INVOKING
                dispatch.attempts += 1
                dispatch.future = self._launch_invoke(payload)
                in_flight += 1
            # The rest go the moment a run ends, not at the next heartbeat (``standby``).
            standby.refill([(d.dispatch_id, self._standby_event(d, now), d.issued_at) for d in waiting])

    def _launch_invoke(self, payload: str) -> Future[InvokeAccepted | AwsError]:
        """Send one async Invoke on the pool (the scheduler thread, or a reader thread through ``standby``)."""
        assert self._pool is not None and self._clients is not None
        return self._pool.submit(
            aws.invoke_async,
            self._clients.lambda_,
            self.config.function_name,
            self.config.qualifier,
            payload,
        )

    def _standby_event(self, dispatch: Dispatch, now: float) -> str:
        """The sealed event a waiting task goes with when a slot frees; sealed again once it is old."""
        if not dispatch.payload or now - dispatch.issued_at >= STANDBY_RESEAL_S / 2:
            dispatch.payload = self._seal(dispatch, now)
        return dispatch.payload

    def _take_launched(self, launched: dict[str, Future[InvokeAccepted | AwsError]]) -> None:
        """Make the invokes a reader thread launched for waiting tasks the invokes of their dispatches."""
        for dispatch_id, future in launched.items():
            dispatch = self._dispatches.current(dispatch_id)
            if dispatch is None:
                future.cancel()  # retired since: a run it started finds its try gone
                continue
            dispatch.payload = ""
            dispatch.attempts += 1
            dispatch.future = future
            if dispatch.state is DispatchState.PENDING:
                dispatch.state = DispatchState.INVOKING
            # else its run's STARTED or FINISHED came first; the invoke's answer is collected all the same
        if launched:
            self._stats_incr("invoke_on_run_end", len(launched))

    def _run_ended(self, result: ResultMessage) -> None:
        """Reader thread: a run of one of this executor's current dispatches reported its end, so its slot is
        free: the oldest task waiting for one goes now. A run that never held the task (a duplicate delivery,
        an expired event) frees no slot this executor counted."""
        if result.phase is not Phase.FINISHED or result.outcome in UNCLAIMED_OUTCOMES:
            return
        if not self._started or self._clock() < self._paused_until:
            return
        self._standby.slot_freed(result.run_id)

    def _collect_invokes(self, now: float) -> None:
        for dispatch in list(self._dispatches.values()):
            future = dispatch.future
            if future is None or not future.done():
                continue
            dispatch.future = None
            if future.cancelled():
                dispatch.state = DispatchState.PENDING
                continue
            outcome: InvokeAccepted | AwsError = future.result()
            if isinstance(outcome, AwsError):
                # A run that already reported STARTED was accepted after all (a 5xx can hide an accepted
                # invoke): invoking it again would start a second run.
                if dispatch.state is DispatchState.INVOKING:
                    self._invoke_refused(dispatch, outcome, now)
                continue
            self._stats_incr("invoke")
            dispatch.first_refused_at = None
            dispatch.request_id = dispatch.request_id or outcome.request_id
            if dispatch.state is not DispatchState.INVOKING:
                continue  # the handler's STARTED message overtook the invoke's answer
            dispatch.state = DispatchState.ACCEPTED
            # A QUEUED event records the external id now, so a scheduler restart can adopt the task.
            self.change_state(
                dispatch.key,
                TaskInstanceState.QUEUED,
                lambda_external_id(self.config.function_name, outcome.request_id, dispatch.dispatch_id),
                remove_running=False,
            )

    def _invoke_refused(self, dispatch: Dispatch, error: AwsError, now: float) -> None:
        key = dispatch.key
        answer = f"{error.code}: {protocol.scrub(error.message, 300)}"
        rejected = error.kind is AwsErrorKind.REJECTED
        if rejected and not dispatch.maybe_accepted:
            # A 4xx: Lambda did not take the event and would refuse it again; nothing ran.
            self._stats_incr("invoke_rejected")
            self._infrastructure_failure(
                dispatch, REASON_INVOKE_REJECTED, f"Lambda refused the invocation: {answer}", held=False
            )
            return
        if rejected or error.kind is AwsErrorKind.UNEXPECTED:
            # Not retried. An exception that is no AWS answer may follow a sent request, and an earlier 5xx or lost
            # answer may hide an accepted event: the same try must not run elsewhere, so it fails.
            reason = f"the invocation failed: {answer}"
            self.log.error("Task %s failed: %s", key, reason)
            self._stats_incr("invoke_rejected" if rejected else "invoke_error")
            self.log_task_event(event="lambda invoke failed", extra=reason, ti_key=key)
            self._finish(dispatch, TaskInstanceState.FAILED, reason)
            return
        metric, verb = _RETRIED_ANSWERS[error.kind]
        self._stats_incr(metric)
        if dispatch.first_refused_at is None:
            dispatch.first_refused_at = now
        # A 429 or a credentials refusal means Lambda did not take the event; a 5xx or a lost answer may hide an
        # accepted one.
        refused = error.kind is not AwsErrorKind.RETRYABLE
        dispatch.maybe_accepted |= not refused
        dispatch.last_refusal = answer
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
                # Only certain refusals: the task never started, so another executor can run the same try.
                credentials = error.kind is AwsErrorKind.CREDENTIALS
                self._infrastructure_failure(
                    dispatch, REASON_CREDENTIALS if credentials else Outcome.THROTTLED, detail, held=False
                )
            return
        delay = backoff_delay(dispatch.attempts, self.config.throttle_backoff_max)
        dispatch.state = DispatchState.PENDING
        dispatch.next_attempt_at = now + delay
        if refused:
            self._paused_until = max(self._paused_until, now + delay)
        log = self.log.warning if error.kind is AwsErrorKind.CREDENTIALS else self.log.info
        log("Invoke of %s %s (%s); retrying in %.1fs", key, verb, dispatch.last_refusal, delay)

    # -- results -----------------------------------------------------------------------------------------------

    def _apply_inbound(self, now: float) -> None:
        for item in self._inbox.take():
            dispatch = self._dispatches.current(item.dispatch_id)
            if dispatch is None:
                continue  # revoked or finished since the reader delivered it
            if item.dead_letter is not None:
                request_id = item.dead_letter.request_id
                if (
                    dispatch.run_id
                    and request_id
                    and dispatch.request_id
                    and request_id != dispatch.request_id
                ):
                    # Another invocation's event (an earlier invoke attempt whose answer was lost) died; the
                    # bound run is not that one.
                    self.log.info("Ignoring a dead letter of request %s for %s", request_id, dispatch.key)
                    self._stats_incr("other_run_result")
                    continue
                if request_id and not dispatch.request_id:
                    dispatch.request_id = request_id
                self._infrastructure_failure(dispatch, item.dead_letter.outcome, item.dead_letter.detail)
            elif item.result is not None:
                self._apply_result(dispatch, item.result, now)

    def _apply_result(self, dispatch: Dispatch, result: ResultMessage, now: float) -> None:
        verdict = runs.judge(dispatch, result)
        if verdict in (runs.Verdict.OTHER_RUN, runs.Verdict.NOT_CLAIMED):
            self._stats_incr(runs.ignore(dispatch, result, verdict, now))
            return
        if result.request_id:
            dispatch.request_id = result.request_id
        if result.phase is Phase.STARTED:
            liveness.renew(dispatch, result, now)  # the bound run sends STARTED again every heartbeat
            if dispatch.state is not DispatchState.STARTED:
                self._mark_started(dispatch, result)
            return
        if dispatch.state is not DispatchState.STARTED and result.outcome is not Outcome.EVENT_EXPIRED:
            # A run shorter than the handler's STARTED grace sends FINISHED alone: it started all the same.
            self._mark_started(dispatch, result)
        self._stats_timing("result_latency", max(0.0, now - dispatch.issued_at))
        self._measurements.record(dispatch.key, result)
        # The handler's send to this scheduler's buffer: what SQS, the shared reader and the heartbeat add.
        self.log.debug(
            "Final of dispatch %s applied %.3fs after the handler sent it at %.3f",
            dispatch.dispatch_id,
            now - result.sent_at,
            result.sent_at,
        )
        outcome = result.outcome
        assert outcome is not None  # the protocol guarantees it for FINISHED
        if outcome is Outcome.SUCCESS:
            self._finish(dispatch, TaskInstanceState.SUCCESS, None)
        elif outcome is Outcome.FAILED:
            detail = f"task failed on Lambda (return code {result.return_code})"
            self._finish(dispatch, TaskInstanceState.FAILED, detail)
        else:
            held = (
                verdict is not runs.Verdict.UNBOUND
            )  # an unbound run's copy ended without claiming the task
            self._infrastructure_failure(dispatch, outcome, result.detail or outcome.value, held=held)

    def _mark_started(self, dispatch: Dispatch, result: ResultMessage) -> None:
        dispatch.state = DispatchState.STARTED
        dispatch.started_at = result.started_at or result.sent_at
        self._stats_timing("start_latency", max(0.0, dispatch.started_at - dispatch.issued_at))
        dispatch.running_beat = self._beat
        self.running_state(
            dispatch.key,
            lambda_external_id(
                self.config.function_name, dispatch.request_id, dispatch.dispatch_id, dispatch.run_id or ""
            ),
        )

    def _infrastructure_failure(
        self, dispatch: Dispatch, outcome: Outcome | str, detail: str, held: bool = True
    ) -> None:
        key = dispatch.key
        reason = outcome.value if isinstance(outcome, Outcome) else outcome
        detail = protocol.scrub(detail, 500)
        failure = InfrastructureFailure(
            reason=reason, detail=detail, executor=f"lambda:{self.config.function_name}", held=held
        )
        self._infra_failures[key] = (failure, self._clock())
        info = f"lambda infrastructure failure: {reason}: {detail}"
        self.log.warning("Task %s: %s (request %s)", key, info, dispatch.request_id or "?")
        self._stats_incr(f"infra_failure.{reason}")
        self.log_task_event(event=f"lambda {reason}", extra=info, ti_key=key)
        self._finish(dispatch, TaskInstanceState.FAILED, info)

    def _finish(self, dispatch: Dispatch, state: TaskInstanceState, info: str | None) -> None:
        self._dispatches.retire(dispatch)
        if dispatch.running_beat == self._beat:
            # RUNNING went into the buffer in this heartbeat: reported now, the final would replace it and the
            # run's id would never reach the task instance. ``running`` keeps the key until then.
            self._held_finals.append((dispatch.key, state, info))
            return
        self.change_state(dispatch.key, state, info)

    def _release_held_finals(self) -> None:
        held, self._held_finals = self._held_finals, []
        for key, state, info in held:
            self.change_state(key, state, info)

    # -- watchdog ----------------------------------------------------------------------------------------------

    def _watchdog(self, now: float, reads: Reads) -> None:
        """Declare dead the dispatches no run of which can act any more (``liveness.death``: a run's heartbeat
        stopped, or past the bound); what receives have not read yet delays the verdict, never makes it."""
        for dispatch in list(self._dispatches.values()):
            death = liveness.death(dispatch, now, self._function_timeout_s, reads)
            if death is not None:
                self._infrastructure_failure(dispatch, *death)

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


__all__ = [
    "LambdaConfigError",
    "LambdaExecutor",
    "LambdaHealthError",
]

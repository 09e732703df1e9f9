"""The function that runs inside AWS Lambda (or the local Lambda service): one Airflow workload per event.

Cold-start budget: at import time the handler's modules (this one, ``task_runner`` and ``process_tree``) load
only the standard library and the wire-message module. boto3 (present in every Lambda Python runtime) is
imported on first use, when a result must be sent; Airflow's task runner when a workload first starts.

What one invocation does:

1. read the event; a malformed one, or one of another protocol version, is logged (scrubbed) and nothing runs.
   The function holds no key to check the event's signature: IAM decides who may invoke it, and a forged event
   can run only a workload whose execution-API token its sender already holds;
2. an event delivered after its ``not_after`` (late or duplicated delivery) reports ``EVENT_EXPIRED`` and does
   not run, so a task that moved to another executor is never taken back by an old event;
3. run the workload as Airflow's LocalExecutor workers do: in a child forked from this process, in its own
   process group, its output streamed to the function's log (``task_runner``);
4. watch the invocation's own deadline: shortly before Lambda would kill the sandbox, stop the child's whole
   process tree (its supervisor frozen first, so the task stays resettable; the operator's on_kill still
   runs) and report ``TIMEOUT`` so the executor can fall back at once instead of waiting for the DLQ
   (``process_tree``);
5. report ``FINISHED`` with ``SUCCESS`` or ``FAILED``, the return code and the start time; ``claimed`` if the
   run's ``/run`` took the task; ``NOT_CLAIMED`` (never a failure) if the execution API refused it (409: another
   copy of the event holds the task, or it moved on); with the invocation's ``REPORT`` figures (``tree_memory``).

Each delivered copy of an event is its own run, named by ``run_id``. ``STARTED`` is reported only once the run
has lasted ``HYBRID_ROUTER_STARTED_GRACE_S`` and has claimed the task (see ``started_notice`` and ``claim``):
most short tasks then cost one SQS message instead of two, and the executor takes a claimed FINISHED with no
STARTED before it as both. A run whose STARTED cannot be sent (retried for a while, then again every heartbeat
within its lease), or whose claim is not known by then, is stopped as at the deadline and reports ``UNREPORTED``.

A result that cannot be sent (after botocore's own retries) raises, so Lambda marks the invocation failed and
the event reaches the DLQ: the executor then learns about the run from there. Except the result of a run that
never held the task (``NOT_CLAIMED``, ``EVENT_EXPIRED``): it is dropped, as its dead letter would name the request
id that the copy holding the task shares.

Results are signed with the key the event carries for its own dispatch; it can sign no other dispatch's.

Environment:
- ``HYBRID_ROUTER_SIGNING_SECRET`` is no longer used; if set it is ignored and withheld from tasks.
- ``HYBRID_ROUTER_DEADLINE_MARGIN_S`` (optional): seconds before the hard deadline at which the workload is
  stopped; default ``min(5, 10% of the time remaining when the invocation starts)``.
- ``HYBRID_ROUTER_FORK_WORKLOADS`` (optional, default ``true``): ``false`` starts every workload as a new
  Python process (slower; for comparison or a runtime where fork misbehaves).
- ``HYBRID_ROUTER_STARTED_GRACE_S`` (optional, default 0.5): how long a run may last before ``STARTED`` is
  sent; ``0`` sends it as soon as the run has claimed the task.
- ``AWS_ENDPOINT_URL_SQS`` and the usual AWS variables are read by boto3 itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.claim import ClaimFile
from hybrid_router.lambda_exec.protocol import InvokeEvent, Outcome, Phase, ResultMessage, RunUsage
from hybrid_router.lambda_exec.started_notice import StartedNotice, notice_terms
from hybrid_router.lambda_exec.task_runner import (
    TaskRunnerLoader,
    WorkloadRun,
    airflow_workload_command,
    run_workload,
)
from hybrid_router.lambda_exec.tree_memory import RunMeter

log = logging.getLogger(__name__)
# Lambda's runtime leaves the root logger at WARNING: our progress lines belong in the function's log.
log.setLevel(logging.INFO)

# The executor's secret, which older releases set on the function: never read, and removed from the environment.
SECRET_ENV = "HYBRID_ROUTER_SIGNING_SECRET"
MARGIN_ENV = "HYBRID_ROUTER_DEADLINE_MARGIN_S"
FORK_ENV = "HYBRID_ROUTER_FORK_WORKLOADS"
STARTED_GRACE_ENV = "HYBRID_ROUTER_STARTED_GRACE_S"
# A run shorter than this reports FINISHED only (one SQS message instead of two); a longer one reports STARTED
# this late. Well below any heartbeat-based timeout of Airflow's, and below the executor's heartbeat.
DEFAULT_STARTED_GRACE_S = 0.5
MAX_STARTED_GRACE_S = 60.0
DEFAULT_MAX_MARGIN_S = 5.0
DEFAULT_MARGIN_FRACTION = 0.10
SEND_MAX_ATTEMPTS = 5


class LambdaContext(Protocol):
    """The parts of Lambda's context object the handler reads."""

    aws_request_id: str
    function_name: str
    log_stream_name: str

    def get_remaining_time_in_millis(self) -> int: ...


class HandlerConfigError(RuntimeError):
    """The function is deployed without a setting it needs; raised so that the invocation fails visibly."""


def handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    """Lambda entry point (``hybrid_router.lambda_exec.handler.handler``)."""
    return handle(event, context, this_sandbox())


def handle(event: Any, context: LambdaContext, sandbox: Sandbox) -> dict[str, Any]:
    """One invocation in ``sandbox``: what ``handler`` does with this process's own sandbox."""
    started_at = time.time()
    meter = RunMeter.start(context)
    try:
        invoke = protocol.read_event(event)
    except protocol.MessageError as exc:
        # The event may hold a token and a key: log only the (token-free) reason, never the event.
        log.error("Rejected an invocation event: %s", protocol.scrub(str(exc)))
        return {"status": "rejected", "reason": protocol.scrub(str(exc))}

    reporter = ResultReporter(invoke, context, invoke.result_signing_key(), sandbox.sqs_client)
    if time.time() > invoke.not_after:
        log.warning(
            "Event %s for %s arrived after its deadline; not running it",
            invoke.dispatch_id,
            _task_label(invoke),
        )
        reporter.send(
            Phase.FINISHED,
            outcome=Outcome.EVENT_EXPIRED,
            started_at=started_at,
            detail=f"event delivered {time.time() - invoke.not_after:.1f}s after its not_after deadline",
            usage=meter.usage(),
        )
        return {"status": Outcome.EVENT_EXPIRED.value}

    # Settings are checked before anything runs: a misconfigured function fails the invocation, not the task.
    settings = sandbox.settings
    margin_s = settings.margin_for(context.get_remaining_time_in_millis() / 1000.0)
    claim = ClaimFile()
    notice = StartedNotice(
        reporter, started_at, settings.started_grace_s, claim=claim.state, **notice_terms(invoke)
    )
    notice.arm()
    log.info("Running %s (dispatch %s, run %s)", _task_label(invoke), invoke.dispatch_id, reporter.run_id)

    stopped_for: list[Outcome] = []  # why the handler stopped the run, once it has

    def must_stop() -> bool:
        meter.sample()  # called every few tens of milliseconds for as long as the workload runs
        if not stopped_for and context.get_remaining_time_in_millis() / 1000.0 <= margin_s:
            stopped_for.append(Outcome.TIMEOUT)
        elif not stopped_for and notice.unconfirmed():
            stopped_for.append(Outcome.UNREPORTED)
        return bool(stopped_for)

    try:
        run = run_workload(
            invoke.workload,
            deadline_near=must_stop,
            margin_s=margin_s,
            fork=settings.fork,
            task_runner=sandbox.task_runner,
            command=sandbox.workload_command,
            claim=claim,
            run_id=reporter.run_id,
        )
    finally:
        # FINISHED never overtakes a STARTED that is being sent; a run that ended within the grace sends none.
        notice.settle()
        claim.state()  # read before the folder goes
        claim.remove()
    # The answer to the run's /run decides when it refused the run, or gave it the task but the task never started.
    outcome, detail = claim.verdict() or _outcome_of(run, stopped_for[0] if stopped_for else Outcome.TIMEOUT)
    log.info("Finished %s: %s %s", _task_label(invoke), outcome.value, detail)
    reporter.send(
        Phase.FINISHED,
        outcome=outcome,
        started_at=started_at,
        return_code=run.return_code,
        detail=detail,
        claimed=claim.claimed,
        usage=meter.usage(),
    )
    return {"status": outcome.value, "return_code": run.return_code}


def _outcome_of(run: WorkloadRun, stopped_for: Outcome) -> tuple[Outcome, str]:
    if run.stopped:
        when = f"{run.margin_s:.1f}s before the Lambda deadline"
        if stopped_for is Outcome.UNREPORTED:
            when = "as its STARTED could not be sent (at the start, or again within its lease)"
        stopped = f"stopped by the handler {when} after {run.duration_s:.1f}s"
        if not run.started:
            return stopped_for, f"{stopped}, still importing Airflow's task runner: the task did not start"
        return stopped_for, f"{stopped} (return code {run.return_code})"
    if run.return_code == 0:
        return Outcome.SUCCESS, ""
    return Outcome.FAILED, f"workload exited with return code {run.return_code}"


@dataclass(eq=False)
class Sandbox:
    """What one Lambda execution environment keeps between invocations: Airflow's imported task runner, the
    SQS client, and the settings, read from ``environ`` when an invocation first needs them (Lambda gives a
    sandbox its environment once; a missing or malformed one fails every invocation that needs it).

    ``handler`` builds one on its first invocation and reuses it (``this_sandbox``); tests build their own.
    """

    environ: Mapping[str, str] = field(default_factory=lambda: os.environ, repr=False)
    # Starts a workload as a new process: when fork is off or Airflow's task runner cannot be imported.
    workload_command: Callable[[str], list[str]] = airflow_workload_command
    # Imports Airflow's task runner for the fork path. Left out, one is made for Airflow's own command; a
    # different command (tests, custom images) gets none and always runs as a new process.
    task_runner: TaskRunnerLoader | None = None
    _sqs: Any = field(default=None, init=False, repr=False)
    _sqs_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.task_runner is None and self.workload_command is airflow_workload_command:
            self.task_runner = TaskRunnerLoader()
        # Lambda gives each sandbox a fresh /tmp, so a HOME below it (examples/aws/Dockerfile) cannot exist
        # in the image: create it once per sandbox, as libraries write caches there.
        home = self.environ.get("HOME", "")
        if home and not os.path.isdir(home):
            # A read-only HOME is the deployment's problem, not a reason to fail every invocation.
            with contextlib.suppress(OSError):
                os.makedirs(home, exist_ok=True)
        if SECRET_ENV in self.environ:
            # Tasks inherit this environment; the function needs no secret. Removing it is not protection (the
            # sandbox's initial environment stays readable): the deployment must not set it.
            log.warning("%s is set on the function but not used: remove it from its settings", SECRET_ENV)
            if isinstance(self.environ, MutableMapping):
                del self.environ[SECRET_ENV]

    @functools.cached_property
    def settings(self) -> RunSettings:
        """How workloads run; checked once the event is known to be valid and on time."""
        return RunSettings.from_environ(self.environ)

    def sqs_client(self) -> Any:
        """One SQS client per sandbox, made for the first result: warm invocations reuse its connections."""
        with self._sqs_lock:
            if self._sqs is None:
                import boto3  # lazily: boto3 costs ~150 ms of import on a cold start
                from botocore.config import Config

                config = Config(
                    retries={"mode": "standard", "max_attempts": SEND_MAX_ATTEMPTS},
                    connect_timeout=5,
                    read_timeout=10,
                )
                self._sqs = boto3.client("sqs", config=config)
            return self._sqs


@functools.cache
def this_sandbox() -> Sandbox:
    """This process's sandbox: built by its first invocation, reused by every later one."""
    return Sandbox()


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The function's settings for running workloads, read from its environment."""

    deadline_margin_s: float | None  # None: the default, from the time left when the invocation starts
    fork: bool
    started_grace_s: float

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> RunSettings:
        return cls(
            deadline_margin_s=_configured_margin_s(environ),
            fork=fork_wanted(environ),
            started_grace_s=started_grace_s(environ),
        )

    def margin_for(self, remaining_s: float) -> float:
        """How long before the hard deadline the workload is stopped, ``remaining_s`` before it."""
        if self.deadline_margin_s is None:
            return min(DEFAULT_MAX_MARGIN_S, DEFAULT_MARGIN_FRACTION * max(remaining_s, 0.0))
        return self.deadline_margin_s


def _configured_margin_s(environ: Mapping[str, str]) -> float | None:
    """``HYBRID_ROUTER_DEADLINE_MARGIN_S``, or None when it is not set."""
    raw = environ.get(MARGIN_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise HandlerConfigError(f"{MARGIN_ENV}={raw!r}: expected a number of seconds, e.g. 5") from None
    if value < 0:
        raise HandlerConfigError(f"{MARGIN_ENV}={raw!r}: must not be negative")
    return value


def fork_wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether workloads start in a forked child (``HYBRID_ROUTER_FORK_WORKLOADS``, default true)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(FORK_ENV, "true").strip().lower()
    if raw in ("1", "true", "yes", "on", ""):
        return hasattr(os, "fork")
    if raw in ("0", "false", "no", "off"):
        return False
    raise HandlerConfigError(f"{FORK_ENV}={raw!r}: expected true or false")


def started_grace_s(environ: Mapping[str, str] | None = None) -> float:
    """How long STARTED is held back (``HYBRID_ROUTER_STARTED_GRACE_S``, default 0.5 s)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(STARTED_GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_STARTED_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        raise HandlerConfigError(
            f"{STARTED_GRACE_ENV}={raw!r}: expected a number of seconds, e.g. 0.5"
        ) from None
    if not 0 <= value <= MAX_STARTED_GRACE_S:
        raise HandlerConfigError(
            f"{STARTED_GRACE_ENV}={raw!r}: must be between 0 and {MAX_STARTED_GRACE_S:g}"
        )
    return value


class ResultReporter:
    """Signs result messages for one event with its dispatch's result key and sends them to its results queue."""

    def __init__(
        self, invoke: InvokeEvent, context: LambdaContext, key: bytes, sqs_client: Callable[[], Any]
    ):
        self.invoke = invoke
        self.context = context
        # Each delivered copy of an event is its own run (AWS may deliver one twice, sharing the request id).
        self.run_id = uuid.uuid4().hex
        self._key = key  # never logged
        self._sqs_client = sqs_client

    def send(
        self,
        phase: Phase,
        *,
        started_at: float,
        outcome: Outcome | None = None,
        return_code: int | None = None,
        detail: str = "",
        claimed: bool = False,
        usage: RunUsage | None = None,
    ) -> None:
        message = ResultMessage(
            phase=phase,
            dispatch_id=self.invoke.dispatch_id,
            task=self.invoke.task,
            sent_at=time.time(),
            started_at=started_at,
            outcome=outcome,
            return_code=return_code,
            detail=protocol.scrub(detail),
            request_id=getattr(self.context, "aws_request_id", ""),
            function_name=getattr(self.context, "function_name", ""),
            log_stream=getattr(self.context, "log_stream_name", ""),
            run_id=self.run_id,
            claimed=claimed,
            lease_s=self.invoke.lease_s if phase is Phase.STARTED else 0.0,
            usage=usage,
        )
        body = protocol.seal_result(message, self._key)
        try:
            self._sqs_client().send_message(QueueUrl=self.invoke.results_queue_url, MessageBody=body)
        except Exception as exc:
            if outcome in protocol.UNCLAIMED_OUTCOMES:
                # Nothing this run could say changes the task. A failed invocation would put the event in the DLQ
                # under the request id every delivered copy shares, read there as the death of the copy that
                # holds the task, which the router would then hand to the fallback while it runs.
                log.warning(
                    "Could not send the %s (%s) result of dispatch %s; dropped, as this run never held the task: %s",
                    phase.value,
                    outcome.value,
                    self.invoke.dispatch_id,
                    protocol.scrub(str(exc)),
                )
                return
            # botocore has already retried; failing the invocation sends the event to the DLQ.
            log.error(
                "Could not send the %s result of dispatch %s: %s",
                phase.value,
                self.invoke.dispatch_id,
                protocol.scrub(str(exc)),
            )
            raise


def _task_label(invoke: InvokeEvent) -> str:
    ref = invoke.task
    return f"{ref.dag_id}.{ref.task_id} run={ref.run_id} try={ref.try_number} map={ref.map_index}"

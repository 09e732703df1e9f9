"""The router's child executors: built from the policy's ``executors`` section, started, and their capacity.

A child whose ``start()`` fails is unavailable (no room) and is started again with back-off, so one child that
cannot start (an expired token on a health check) never stops the scheduler.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hybrid_router.child_protocol import (
    CapacityAware,
    FunctionLimits,
    InfrastructureFailure,
    ReportsInfrastructureFailures,
    ReportsRunMeasurements,
    RunMeasurement,
)
from hybrid_router.redaction import error_text, secret_values, shown_options, traceback_text
from hybrid_router.router.forked_connections import close_connections_shared_with_forks

if TYPE_CHECKING:
    from airflow.executors.base_executor import BaseExecutor
    from airflow.models.taskinstancekey import TaskInstanceKey

    from hybrid_router.router.provider_config import ProviderSection
    from hybrid_router.router.shared_capacity import SharedLimits

log = logging.getLogger(__name__)


class ChildConfigError(ValueError):
    """An executor entry of the policy cannot be turned into a running executor.

    Its message names options but shows only the values of non-secret ones (``hybrid_router.redaction``).
    """


def resolve_executor_class(name: str, class_path: str) -> type[BaseExecutor]:
    """The class of a policy executor entry: an Airflow short name (``LocalExecutor``) or an import path."""
    from airflow._shared.module_loading import import_string
    from airflow.executors.base_executor import BaseExecutor
    from airflow.executors.executor_loader import ExecutorLoader

    module_path = ExecutorLoader.executors.get(class_path, class_path)
    if "." not in module_path:
        known = ", ".join(sorted(ExecutorLoader.executors))
        raise ChildConfigError(
            f"executors.{name}.class: {class_path!r} is neither an Airflow executor short name ({known}) "
            f"nor an import path; write e.g. 'class: LocalExecutor' or "
            f"'class: hybrid_router.lambda_exec.LambdaExecutor'"
        )
    try:
        cls = import_string(module_path)
    except ImportError as err:
        raise ChildConfigError(f"executors.{name}.class: cannot import {module_path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, BaseExecutor)):
        raise ChildConfigError(f"executors.{name}.class: {module_path!r} is not a subclass of BaseExecutor")
    return cls


def _accepted_kwargs(cls: type) -> tuple[set[str], bool]:
    """Keyword names the constructors of ``cls`` name, and whether one of them takes ``**kwargs``.

    With ``**kwargs`` somewhere in the chain (LocalExecutor passes them on, the Lambda executor keeps them as
    its options) the names cannot be known before calling: a wrong one then fails at construction instead.
    """
    names: set[str] = set()
    open_ended = False
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(
            p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        )
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
        open_ended = True
    return names, open_ended


def instantiate_child(
    name: str,
    class_path: str,
    *,
    max_concurrency: int | None,
    options: Mapping[str, Any],
    team_name: str | None = None,
) -> BaseExecutor:
    """Build one child executor. Its ``parallelism`` is the policy's ``max_concurrency`` when that is set."""
    from airflow.executors.executor_utils import ExecutorName

    from hybrid_router.router.provider_config import provider_section, with_options

    secrets = secret_values(options)
    cls = resolve_executor_class(name, class_path)
    accepted, open_ended = _accepted_kwargs(cls)
    section = provider_section(cls) if options else None
    read_from_section = ""
    if section is not None:
        # The class reads its settings from a provider config section, not from its constructor: the options
        # become that child's own values of the section (see provider_config.py).
        _check_section_keys(name, section, options)
        cls = with_options(cls, section.name, options)
        read_from_section = f" with [{section.name}] options {shown_options(options)}"
        options = {}
    unknown = sorted(set(options) - accepted)
    if unknown and not open_ended:
        raise ChildConfigError(
            f"executors.{name}.options: {cls.__name__} does not accept {', '.join(unknown)} "
            f"(it accepts: {', '.join(sorted(accepted)) or 'no options'})"
        )
    kwargs: dict[str, Any] = dict(options)
    if max_concurrency is not None and "parallelism" in accepted:
        kwargs["parallelism"] = max_concurrency
    if team_name is not None and "team_name" in accepted:
        kwargs["team_name"] = team_name
    try:
        executor = cls(**kwargs)
    except Exception as err:
        # Not chained: a traceback would print the cause's own text, option values and all.
        raise ChildConfigError(
            f"executors.{name}: {cls.__name__}({shown_options(kwargs)}){read_from_section} failed: "
            f"{error_text(err, secrets, limit=None)}"
        ) from None
    executor.name = ExecutorName(module_path=f"{cls.__module__}.{cls.__qualname__}", alias=name)
    return executor


def _check_section_keys(name: str, section: ProviderSection, options: Mapping[str, Any]) -> None:
    for key in options:
        if key in section.keys:
            continue
        close = difflib.get_close_matches(key, section.keys, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ChildConfigError(
            f"executors.{name}.options.{key}: not a key of [{section.name}] (known: "
            f"{', '.join(sorted(section.keys))}){hint}"
        )


# A child whose start() failed is tried again after this long, doubling up to the cap, minus up to a fifth
# (jitter, so that children that failed together are not retried together).
START_RETRY_FIRST_S = 15.0
START_RETRY_MAX_S = 300.0
START_RETRY_JITTER = 0.2


@dataclass
class StartFailure:
    """Why a child is unavailable (its start() failed), since when, and when it is tried again."""

    error: str  # the exception's type and its message, the child's secret option values scrubbed
    since: float
    attempts: int
    next_attempt_at: float


def start_retry_delay(attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next start attempt after ``attempts`` failed ones: bounded exponential, with jitter."""
    delay = min(START_RETRY_FIRST_S * 2 ** (attempts - 1), START_RETRY_MAX_S)
    return delay * (1 - START_RETRY_JITTER * rand())


@dataclass
class Child:
    """One child executor and what the router knows about it that the child itself does not track."""

    name: str
    executor: BaseExecutor
    max_concurrency: int | None = None
    # Keys dispatched to this child and not yet finished. LocalExecutor (and BaseExecutor.trigger_tasks) never
    # fill ``running``, so the child's own count cannot be trusted for capacity.
    in_flight: set[TaskInstanceKey] = field(default_factory=set)
    # Tasks the child may hold beyond ``limit`` in its own queue, so that a worker that is done starts the
    # next one at once, not one scheduler loop later (when the router uses it: ``waiting.prefetch_room``).
    prefetch: int = 0
    # Scrubbed from the child's exceptions before they are logged or shown: its secret option values.
    masked_values: frozenset[str] = frozenset()
    # Set while the child is unavailable: its start() failed, and it has no room until a retry succeeds.
    start_failure: StartFailure | None = None
    # The policy's ``limits.max_memory_mb``: for a Lambda child, its function's memory size.
    max_memory_mb: int | None = None
    # The policy's ``limits.max_duration``: for a Lambda child, its function's timeout.
    max_duration_s: float | None = None
    # Set when the child may share its capacity with other schedulers' children (a Lambda function's concurrency).
    shared_limits: SharedLimits | None = None

    @property
    def limit(self) -> int:
        return self.max_concurrency if self.max_concurrency is not None else self.executor.parallelism

    @property
    def available(self) -> bool:
        return self.start_failure is None

    def error_text(self, err: BaseException) -> str:
        """``<type>: <message>`` of an exception from this child, its secret option values scrubbed."""
        return error_text(err, self.masked_values)

    def traceback_text(self, err: BaseException) -> str:
        """The traceback of an exception from this child, for a log line, its secret option values scrubbed."""
        return traceback_text(err, self.masked_values)

    def start(self, now: float) -> bool:
        """Start the executor; never raises. On failure the child is unavailable until ``retry_start`` succeeds.

        Logged when the child becomes unavailable and when it is back, not on every retry; every failure counted.
        """
        from hybrid_router.router import metrics

        try:
            self.executor.start()
        except Exception as err:
            failure = self.start_failure
            attempts = failure.attempts + 1 if failure else 1
            self.start_failure = StartFailure(
                error=self.error_text(err),
                since=failure.since if failure else now,
                attempts=attempts,
                next_attempt_at=now + start_retry_delay(attempts),
            )
            metrics.count_child_start_failed(self.name)
            if failure is None:
                log.error(
                    "Child executor %s failed to start (%s); it takes no tasks until it starts: they overflow, "
                    "fall back or wait in the router. Retrying with back-off up to every %.0fs",
                    self.name,
                    self.start_failure.error,
                    START_RETRY_MAX_S,
                )
            else:
                log.debug("Child executor %s failed to start again (%s)", self.name, self.start_failure.error)
            return False
        # The executor may have forked (a LocalExecutor's workers): they must not share the scheduler's sessions.
        close_connections_shared_with_forks()
        self._warn_about_limits_unlike_its_compute()
        if self.start_failure is not None:
            log.warning(
                "Child executor %s started after %d failed attempts over %.0fs; it takes tasks again",
                self.name,
                self.start_failure.attempts,
                now - self.start_failure.since,
            )
            self.start_failure = None
        return True

    def _warn_about_limits_unlike_its_compute(self) -> None:
        """The router routes by the policy's ``limits``: say so when the child's compute allows otherwise (a
        Lambda function resized, or its timeout changed, since the policy was written)."""
        found = getattr(self.executor, "function_limits", None)
        if not isinstance(found, FunctionLimits):
            return
        checks = (
            ("limits.max_memory_mb", self.max_memory_mb, found.memory_mb, "MB", "memory size", "run out of memory"),
            ("limits.max_duration", self.max_duration_s, found.timeout_s, "s", "timeout", "time out"),
        )  # fmt: skip
        for option, declared, real, unit, what, death in checks:
            if real is None or declared == real:
                continue
            if declared is None or declared > real:
                said = f"{declared:g} {unit}" if declared is not None else "not set"
                effect = f"tasks the policy sends there may {death}"
            else:
                said, effect = f"{declared:g} {unit}", "tasks that would fit it are sent elsewhere"
            log.warning(
                "Executor %s: the policy's %s is %s but its function's %s is %g %s: %s. The router routes by "
                "the policy's figure; make it the function's.",
                self.name, option, said, what, real, unit, effect,
            )  # fmt: skip

    def retry_start(self, now: float) -> None:
        """Try to start an unavailable child again once its back-off has passed."""
        if self.start_failure is not None and now >= self.start_failure.next_attempt_at:
            self.start(now)

    def free_slots(self) -> int:
        """How many more tasks this child can start now: the tightest of every bound it has (0 if unavailable)."""
        return self._room(self.limit)

    def prefetch_slots(self) -> int:
        """How many more tasks this child can take to wait in its own queue once ``free_slots`` is used up."""
        if self.prefetch <= 0:
            return 0
        return max(self._room(self.limit + self.prefetch, beyond=self.prefetch) - self.free_slots(), 0)

    def _room(self, bound: int, *, beyond: int = 0) -> int:
        """Room under ``bound`` and every other bound of the child; ``beyond``: how many tasks past what it can
        start now (its free capacity, its shared pool's room) it may hold in its own queue."""
        if self.start_failure is not None:
            return 0
        free = min(bound - len(self.in_flight), self.executor.slots_available)
        if isinstance(self.executor, CapacityAware):
            try:
                free = min(free, int(self.executor.free_capacity()) + beyond)
            except Exception as err:
                log.error(
                    "free_capacity() of executor %s failed; treating it as full: %s",
                    self.name,
                    self.traceback_text(err),
                )
                return 0
        if self.shared_limits is not None:
            shared = self.shared_limits.room(self)
            free = free if shared is None else min(free, shared + beyond)
        return max(free, 0)

    def pop_infrastructure_failure(self, key: TaskInstanceKey) -> InfrastructureFailure | None:
        failure = self._ask(ReportsInfrastructureFailures, "pop_infrastructure_failure", key)
        if failure is not None and not failure.executor:
            failure = dataclasses.replace(failure, executor=self.name)
        return failure

    def pop_run_measurement(self, key: TaskInstanceKey) -> RunMeasurement | None:
        return self._ask(ReportsRunMeasurements, "pop_run_measurement", key)

    def _ask(self, interface: type, method: str, key: TaskInstanceKey) -> Any:
        """``method(key)`` of a child that offers ``interface`` (``child_protocol``); None from any other child,
        or when it raises (logged): a child's bug must not stop the router from forwarding its events."""
        if not isinstance(self.executor, interface):
            return None
        try:
            return getattr(self.executor, method)(key)
        except Exception as err:
            log.error(
                "%s() of executor %s failed for %s: %s", method, self.name, key, self.traceback_text(err)
            )
            return None


def default_prefetch(executor: BaseExecutor, limit: int) -> int:
    """``limit`` for an executor that starts a task it holds the moment a run of its ends (LocalExecutor, whose
    idle workers take queued tasks at once; LambdaExecutor, which invokes the next when a run reports its end);
    0 for any other executor.

    Most other executors start whatever they are handed (ECS, Batch): a prefetch there would raise concurrency,
    not hide latency. Celery and Kubernetes queue outside the executor, where the router's priority order and
    overflow would be lost to their brokers.
    """
    from airflow.executors.local_executor import LocalExecutor

    if isinstance(executor, LocalExecutor) or getattr(executor, "fills_freed_slots_at_once", False):
        return limit
    return 0


def _make_room_for_prefetch(child: Child) -> None:
    """A child that counts what it holds in its own ``running`` (LambdaExecutor) takes no more tasks than its
    ``parallelism``: for it to hold its prefetch, that is its limit plus its prefetch, while it still starts no
    more than its limit at once (``max_in_flight``)."""
    executor = child.executor
    if child.prefetch <= 0 or not getattr(executor, "fills_freed_slots_at_once", False):
        return
    limit = child.limit
    child.max_concurrency = limit  # the limit stays what it was, whatever the executor's parallelism becomes
    executor.parallelism = limit + child.prefetch
    executor.max_in_flight = limit


def build_children(specs: Mapping[str, Any], team_name: str | None = None) -> dict[str, Child]:
    """Children for every entry of ``policy.executors`` (``ExecutorSpec``-like objects), in policy order."""
    children: dict[str, Child] = {}
    for name, spec in specs.items():
        limits = getattr(spec, "limits", None)
        executor = instantiate_child(
            name,
            spec.class_path,
            max_concurrency=spec.max_concurrency,
            options=spec.options or {},
            team_name=team_name,
        )
        child = Child(
            name=name,
            executor=executor,
            max_concurrency=spec.max_concurrency,
            masked_values=secret_values(spec.options or {}),
            max_memory_mb=getattr(limits, "max_memory_mb", None),
            max_duration_s=getattr(limits, "max_duration_s", None),
        )
        prefetch = getattr(spec, "prefetch", None)
        child.prefetch = prefetch if prefetch is not None else default_prefetch(executor, child.limit)
        _make_room_for_prefetch(child)
        children[name] = child
    from hybrid_router.router.shared_capacity import link_shared_limits

    link_shared_limits(children)
    return children

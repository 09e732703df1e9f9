"""The RoutingExecutor: one Airflow executor that runs each task on the child executor its policy chooses.

The scheduler sees only this executor. For every queued task it asks the policy where the task should run,
hands the workload to that child (or to the first overflow child with room, or keeps it waiting, ordered by
priority, until one has room), forwards the children's events, and after an infrastructure failure reported by
a child hands the same try to the next fallback executor.

Every decision is visible three ways: a line in the task's own log, the child's name at the front of the task
instance's ``external_executor_id``, and an audit row in Airflow's ``log`` table, plus a metric per executor
and per rule. This module carries the decisions out; they are made beside it: which child takes a waiting task
(``waiting.py``), what follows an infrastructure failure (``fallback.py``), what people are told
(``audit.py``), who adopts a task after a restart (``adoption.py``), when the policy is reloaded
(``policy_file.py``), whether a child can take tasks at all (``children.py``), which child's log a try has
(``child_logs.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from airflow.executors import workloads
from airflow.executors.base_executor import PARALLELISM, BaseExecutor
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.state import TaskInstanceState

from hybrid_router.redaction import scrub
from hybrid_router.router import audit, metrics
from hybrid_router.router.adoption import keep_owned, offer_to_children, queue_again
from hybrid_router.router.child_logs import read_child_log
from hybrid_router.router.children import Child, build_children
from hybrid_router.router.external_id import join_child_id, router_held_id
from hybrid_router.router.fallback import (
    SAME_TRY,
    FallbacksExhausted,
    NextTryRoutes,
    RerunSameTry,
    RouteNextTry,
    decide_fallback,
    redispatch_same_try,
    refresh_queued_dttm,
)
from hybrid_router.router.live_state import LiveStatePublisher, router_snapshot
from hybrid_router.router.measured_runs import OUT_OF_MEMORY, RunRecorder
from hybrid_router.router.policy.facts import EXECUTOR_CONFIG_SECTION
from hybrid_router.router.policy_file import PolicyFile
from hybrid_router.router.shared_capacity import hand_over
from hybrid_router.router.task_timeouts import ExecutionTimeouts
from hybrid_router.router.waiting import (
    KEEP_WAITING_ALIVE_EVERY_S,
    TOKEN_REFRESH_AFTER_S,
    Assignment,
    Pending,
    PendingKind,
    Room,
    prefetch_room,
)

if TYPE_CHECKING:
    from airflow.executors.workloads import ExecutorWorkload
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy.orm import Session

    from hybrid_router.child_protocol import InfrastructureFailure
    from hybrid_router.router.config import RouterConfig
    from hybrid_router.router.policy import Decision, MemoryLookup, Policy

log = logging.getLogger(__name__)


def strip_router_keys(workload: workloads.ExecuteTask) -> workloads.ExecuteTask:
    """The workload a child sees: ``executor_config`` without the router's own section.

    The ECS executor merges ``executor_config`` into its ``RunTask`` call, which rejects unknown keys.
    """
    config = workload.ti.executor_config
    if not isinstance(config, dict) or EXECUTOR_CONFIG_SECTION not in config:
        return workload
    cleaned = {k: v for k, v in config.items() if k != EXECUTOR_CONFIG_SECTION}
    ti = workload.ti.model_copy(update={"executor_config": cleaned})
    return workload.model_copy(update={"ti": ti})


class RoutingExecutor(BaseExecutor):
    """Routes each task to a child executor by policy, with overflow, fallback and adoption.

    The constructor reads nothing and starts nothing: the API server and ``airflow dags test`` also build
    executors. ``policy``, ``config`` and ``children`` may be passed in (tests, embedding); otherwise
    ``start()`` reads ``[hybrid_router]`` and builds the children. Sizing ``[core] parallelism`` and each
    child's ``max_concurrency`` and ``prefetch``: docs/tuning.md.
    """

    # Class flags are read on the class before start(), when the children are not built yet; they describe the
    # children the router can run. LocalExecutor children run on this host and write their logs here.
    is_local: bool = True
    serve_logs: bool = True
    # Callbacks and connection tests go to the first child that supports them; start() turns these on for
    # this instance when there is one, so the base class refuses them with a clear error when there is not.
    supports_callbacks: bool = False
    supports_connection_test: bool = False
    supports_multi_team: bool = True

    def __init__(
        self,
        parallelism: int = PARALLELISM,
        team_name: str | None = None,
        *,
        policy: Policy | None = None,
        config: RouterConfig | None = None,
        children: dict[str, Child] | None = None,
        history: Callable[[str, str], float | None] | None = None,
        memory: MemoryLookup | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(parallelism=parallelism, team_name=team_name)
        self._policy = policy
        self._config = config
        self._children: dict[str, Child] = children or {}
        self._history = history
        self._memory = memory
        self._clock = clock
        self._waiting: dict[TaskInstanceKey, Pending] = {}
        self._assignments: dict[TaskInstanceKey, Assignment] = {}
        self._next_try_routes = NextTryRoutes()
        self._execution_timeouts = ExecutionTimeouts()
        self._audit = audit.AuditLog()
        self._runs = RunRecorder(self._audit)
        self._audit_enabled = True
        self._live_state = LiveStatePublisher(every_s=0)  # start() turns it on from [hybrid_router]
        self._policy_file: PolicyFile | None = None  # set when the policy comes from a file (``config``)
        self._started = False
        self._log_readers: dict[str, Child | None] = {}
        self._task_queued_timeout_s = 600.0  # [scheduler] task_queued_timeout, read by start()

    # -- start / stop ----------------------------------------------------------------------------------------

    def _ensure_policy(self) -> Policy:
        if self._config is None and self._policy is None:
            from hybrid_router.router.config import RouterConfig

            self._config = RouterConfig.from_airflow_conf()
        if self._config is not None and self._policy_file is None:
            self._policy_file = PolicyFile(
                self._config.policy_file,
                reload_interval=float(self._config.reload_interval),
                clock=self._clock,
            )
        if self._policy is None:
            self._policy = self._policy_file.load()
        return self._policy

    def start(self) -> None:
        self._ensure_policy()
        if self._config is not None:
            self._audit_enabled = self._config.audit_log
            self._live_state = LiveStatePublisher.from_config(self._config, clock=self._clock)
            self._policy_file.start_watching()
            if self._history is None and self._config.history_enabled:
                self._history = self._build_history()
                self._memory = self._build_memory_history()
        if not self._children:
            self._children = build_children(self._policy.executors, team_name=self.team_name)
        for child in self._children.values():
            child.executor.job_id = self.job_id
            child.executor.callback_sink = self.callback_sink
            # Never raises: a child that cannot start is unavailable (no room) and is retried in sync().
            child.start(self._clock())
        self.supports_callbacks = any(c.executor.supports_callbacks for c in self._children.values())
        self.supports_connection_test = any(
            c.executor.supports_connection_test for c in self._children.values()
        )
        self._task_queued_timeout_s = self._read_task_queued_timeout_s()
        self._started = True
        log.info(
            "RoutingExecutor started with children %s, fallback mode %s",
            ", ".join(
                f"{c.name}={type(c.executor).__name__}(limit {c.limit}, prefetch {c.prefetch}"
                f"{'' if c.available else ', NOT STARTED'})"
                for c in self._children.values()
            ),
            self.fallback_mode,
        )

    @staticmethod
    def _read_task_queued_timeout_s() -> float:
        from airflow.configuration import conf

        return conf.getfloat("scheduler", "task_queued_timeout", fallback=600.0)

    def end(self) -> None:
        self._for_each_child("end", lambda c: c.executor.end())
        self._flush_audit()
        self._live_state.withdraw()

    def terminate(self) -> None:
        self._for_each_child("terminate", lambda c: c.executor.terminate())
        self._flush_audit()
        self._live_state.withdraw()

    def _for_each_child(self, what: str, action: Callable[[Child], Any]) -> None:
        # One child failing to stop must not leave the others running.
        for child in self._children.values():
            try:
                action(child)
            except Exception as err:
                log.error("%s() of child executor %s failed: %s", what, child.name, child.traceback_text(err))

    # -- policy ----------------------------------------------------------------------------------------------

    @property
    def policy(self) -> Policy | None:
        return self._policy

    @property
    def children(self) -> dict[str, Child]:
        return self._children

    @property
    def fallback_mode(self) -> str:
        return self._policy.fallback_mode if self._policy is not None else SAME_TRY

    @property
    def max_fallbacks(self) -> int:
        return self._policy.max_fallbacks

    def reload_policy(self) -> bool:
        """Load the policy file again if it changed; keep the last good policy when the new one is bad."""
        if self._policy_file is None:
            return False
        return self._use_policy(self._policy_file.reload(self._policy))

    def _use_policy(self, policy: Policy | None) -> bool:
        if policy is None:
            return False
        self._policy = policy
        return True

    def _build_history(self) -> Callable[[str, str], float | None]:
        from airflow.utils.session import create_session

        from hybrid_router.router.history import TaskDurationHistory

        # Its own sessions, never the scheduler's scoped one: the lookup runs inside the scheduler's
        # queueing transaction, and closing the scoped session there would detach the scheduler's objects.
        return TaskDurationHistory(
            partial(create_session, scoped=False),
            days=self._config.history_days,
            min_runs=self._config.history_min_runs,
            ttl=self._config.history_cache_ttl,
        )

    def _build_memory_history(self) -> MemoryLookup:
        from hybrid_router.router.measured_runs import memory_lookup

        return memory_lookup(self._runs, days=self._config.history_days, ttl=self._config.history_cache_ttl)

    # -- queueing and routing --------------------------------------------------------------------------------

    def queue_workload(self, workload: ExecutorWorkload, session: Session | None) -> None:
        if isinstance(workload, workloads.ExecuteTask):
            self._queue_task(workload, session)
            return
        # Callbacks and connection tests have no policy: the base class refuses them when no child supports
        # them, otherwise they go straight to the first child that does.
        super().queue_workload(workload, session)
        self.queued_callbacks.pop(workload.key, None)
        self.queued_connection_tests.pop(workload.key, None)
        flag = (
            "supports_callbacks"
            if isinstance(workload, workloads.ExecuteCallback)
            else "supports_connection_test"
        )
        child = next(c for c in self._children.values() if getattr(c.executor, flag))
        child.executor.queue_workload(workload, session)

    def _queue_task(self, workload: workloads.ExecuteTask, session: Session | None) -> None:
        key = workload.ti.key
        next_try = self._next_try_routes.take(key)
        try:
            decision = self.decide(workload, session)
        except Exception as err:
            self._reject(workload, err)
            return
        if next_try is not None and next_try.executor in self._children:
            pending = Pending(
                candidates=(next_try.executor, *next_try.remaining),
                decision=decision,
                kind=PendingKind.NEXT_TRY,
                failed_on=next_try.failed_on,
            )
        else:
            candidates = (decision.executor, *decision.overflow)
            pending = Pending(
                candidates=tuple(c for c in candidates if c in self._children), decision=decision
            )
        pending.since = self._clock()
        self.queued_tasks[key] = workload
        self._waiting[key] = pending
        self._assignments[key] = Assignment(
            ti_id=workload.ti.id, decision=decision, log_path=workload.log_path
        )
        # Over the previous try's id, which Airflow keeps: adoption must not hand this try to that run.
        self.event_buffer[key] = (TaskInstanceState.QUEUED, router_held_id(key.try_number))

    def decide(self, workload: workloads.ExecuteTask, session: Session | None = None) -> Decision:
        """The policy's decision for a queued task, from its task instance's facts."""
        ti_dto = workload.ti
        pool = operator = None
        execution_timeout_s = None
        if session is not None:
            from airflow.models.taskinstance import TaskInstance

            # The scheduler loaded this row in the same session a moment ago: an identity-map hit, no query.
            ti = session.get(TaskInstance, ti_dto.id)
            if ti is not None:
                pool, operator = ti.pool, ti.operator
            execution_timeout_s = self._execution_timeouts.get(session, ti_dto.dag_version_id, ti_dto.task_id)
        return self._decide(
            dag_id=ti_dto.dag_id,
            task_id=ti_dto.task_id,
            queue=ti_dto.queue,
            pool=pool,
            operator=operator,
            executor_config=ti_dto.executor_config,
            execution_timeout_s=execution_timeout_s,
        )

    def _decide(self, **facts: Any) -> Decision:
        from hybrid_router.router.policy import resolve_facts

        return self._policy.decide(resolve_facts(**facts, history=self._history, memory=self._memory))

    def _decide_from_row(self, ti_id: Any) -> Decision | None:
        """The decision for a task adopted after a restart (its own was lost with the old scheduler)."""
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        with create_session(scoped=False) as session:
            ti = session.get(TaskInstance, ti_id)
            if ti is None:
                return None
            facts = {
                "dag_id": ti.dag_id,
                "task_id": ti.task_id,
                "queue": ti.queue,
                "pool": ti.pool,
                "operator": ti.operator,
                "executor_config": ti.executor_config,
            }
        return self._decide(**facts)

    def _reject(self, workload: workloads.ExecuteTask, err: Exception) -> None:
        """A task the policy cannot route (bad ``executor_config``): fail it with the reason, visibly."""
        key = workload.ti.key
        notice = audit.route_error(err)
        log.error("Cannot route %s: %s", key, err)
        self._tell(key, workload.log_path, notice)
        self.event_buffer[key] = (TaskInstanceState.FAILED, notice.message)

    def _tell(self, key: TaskInstanceKey, log_path: str | None, notice: audit.Notice) -> None:
        """Write ``notice`` to the task's log and, unless audit rows are off, to Airflow's audit log."""
        audit.write_task_log_line(log_path, notice.message, level=notice.level)
        if notice.event is not None and self._audit_enabled:
            self._audit.record(notice.event, key, **notice.extra)

    # -- capacity --------------------------------------------------------------------------------------------

    @property
    def slots_available(self) -> int:
        """The children's free slots (prefetch included) plus the free room in the router's own queue.

        The queue holds one more wave (the children's limits added up) so that a task that finishes is
        replaced in the same heartbeat from the queue, not one scheduler loop later. A task in the queue is
        never dropped; it waits for a child with room, highest priority first.
        """
        if not self._started:
            return super().slots_available
        free = sum(child.free_slots() + self._prefetch_room(child) for child in self._children.values())
        queue_room = sum(child.limit for child in self._children.values()) - len(self.queued_tasks)
        return free + max(queue_room, 0)

    def _prefetch_room(self, child: Child) -> int:
        decisions = (
            assignment.decision if (assignment := self._assignments.get(key)) else None
            for key in child.in_flight
        )
        return prefetch_room(child, decisions, task_queued_timeout_s=self._task_queued_timeout_s)

    def _dispatch_waiting(self) -> set[str]:
        """Hand waiting tasks, highest priority first, to a candidate with room. Returns the children used."""
        if not self._waiting:
            return set()
        room = Room(self._children, self._prefetch_room)
        chosen: list[tuple[TaskInstanceKey, workloads.ExecuteTask, Pending, str]] = []
        for key, workload in self.order_queued_tasks_by_priority():
            pending = self._waiting[key]
            target = room.take(pending.candidates)
            if target is None:
                if not pending.announced_wait:
                    pending.announced_wait = True
                    self._announce_wait(key, workload, pending)
                continue
            chosen.append((key, workload, pending, target))
        # Stored before any child has them (adoption.py); without a scheduler job nobody adopts them.
        if chosen and self.job_id is not None:
            kept = hand_over(self._children, chosen, self._assignments) and keep_owned(
                chosen, self._assignments, self.job_id, self.revoke_task
            )
            if not kept:
                return set()
            chosen = kept
        for key, workload, pending, target in chosen:
            self._dispatch(key, workload, pending, target)
        return {target for *_, target in chosen}

    def _announce_wait(self, key: TaskInstanceKey, workload: workloads.ExecuteTask, pending: Pending) -> None:
        log.info(
            "No room for %s on %s; it waits in the router", key, audit.candidate_list(pending.candidates)
        )
        metrics.count_waiting(pending.candidates[0] if pending.candidates else "none")
        self._tell(key, workload.log_path, audit.waiting(pending.candidates))

    def _dispatch(
        self, key: TaskInstanceKey, workload: workloads.ExecuteTask, pending: Pending, target: str
    ) -> None:
        child = self._children[target]
        assignment = self._assignments[key]
        if self._clock() - pending.since > TOKEN_REFRESH_AFTER_S:
            workload = workload.model_copy(
                update={
                    "token": workloads.ExecuteTask.generate_token(str(workload.ti.id), self.jwt_generator)
                }
            )
        notice = pending.dispatch_notice(target, now=self._clock())
        del self.queued_tasks[key]
        del self._waiting[key]
        try:
            child.executor.queue_workload(strip_router_keys(workload), None)
        except Exception as err:
            # A child that refuses a workload outright (not a capacity matter) would refuse it again: fail
            # the task with the reason rather than stall the scheduler loop or retry forever.
            log.error("Child executor %s refused %s: %s", target, key, child.traceback_text(err))
            self._assignments.pop(key, None)
            self._reject(workload, audit.refused_by_child(target, scrub(str(err), child.masked_values)))
            return
        self._tell(key, workload.log_path, notice)
        child.in_flight.add(key)
        self.running.add(key)
        assignment.child = target
        assignment.tried.append(target)
        # Written now, not when the child reports RUNNING: a task must be adoptable by its child's name even
        # if the scheduler dies before the child says anything.
        self.event_buffer[key] = (
            TaskInstanceState.QUEUED,
            join_child_id(target, None, try_number=key.try_number),
        )
        if pending.kind is PendingKind.FALLBACK:
            metrics.count_fallback(pending.failed_on or "unknown", target, pending.failure.reason)
        else:
            metrics.count_routed(target, pending.decision.rule)
            if pending.candidates and target != pending.candidates[0]:
                metrics.count_overflow(pending.candidates[0], target)
        log.info("%s -> %s (%s)", key, target, notice.extra.get("how"))

    # -- heartbeat -------------------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        if self._policy_file is not None:
            self._use_policy(self._policy_file.reload_if_due(self._policy))
        self._dispatch_waiting()
        self._emit_metrics(self.slots_available, len(self.running), len(self.queued_tasks))
        self.sync()

    def sync(self) -> None:
        """Heartbeat every child, forward its events, and hand on the tries that died for infrastructure reasons."""
        for child in self._children.values():
            child.retry_start(self._clock())
            self._heartbeat_child(child)
        for child in self._children.values():
            self._collect_events(child)
            self._audit.adopt(self._drain(child.executor._task_event_logs))
        # Slots freed by finished runs, and fallback runs, are filled in this heartbeat, not the next: every
        # scheduler loop a task waits for is latency.
        for name in self._dispatch_waiting():
            self._heartbeat_child(self._children[name])
        self._keep_waiting_alive()
        for child in self._children.values():
            metrics.gauge_child(
                child.name, in_flight=len(child.in_flight), free=child.free_slots(), available=child.available
            )
        metrics.gauge_waiting(len(self._waiting))
        self._flush_audit()
        self._live_state.publish(
            partial(router_snapshot, self._children, self._waiting.values()), job_id=self.job_id
        )

    @staticmethod
    def _drain(rows: Any) -> list[Any]:
        drained = []
        while rows:
            drained.append(rows.popleft())
        return drained

    def _flush_audit(self) -> None:
        self._runs.flush()
        self._audit.flush()

    def _heartbeat_child(self, child: Child) -> None:
        if not child.available:
            return
        # The catch-all boundary: one broken child must not stop the others or the scheduler loop.
        try:
            child.executor.heartbeat()
        except Exception as err:
            log.error("Heartbeat of child executor %s failed: %s", child.name, child.traceback_text(err))

    def _collect_events(self, child: Child) -> None:
        """Forward one child's events; a run that died for infrastructure reasons goes back to wait."""
        for key, (state, info) in child.executor.get_event_buffer().items():
            if not isinstance(key, TaskInstanceKey):
                # Callbacks and connection tests: their events go to the scheduler as the child gave them.
                self.event_buffer[key] = (state, info)
                continue
            assignment = self._assignments.get(key)
            if assignment is None or assignment.child != child.name:
                # A dead run's late events (the key moved on to a fallback) or a revoked task: forwarding them
                # would fail a try another executor now owns.
                log.debug("Dropping event %s for %s from %s, which no longer owns it", state, key, child.name)
                continue
            if state in (TaskInstanceState.QUEUED, TaskInstanceState.RUNNING):
                self.event_buffer[key] = (state, join_child_id(child.name, info, try_number=key.try_number))
                continue
            failure = child.pop_infrastructure_failure(key) if state == TaskInstanceState.FAILED else None
            self._runs.finished(key, child, assignment.ti_id, state, failure)
            if failure is not None and self._on_infrastructure_failure(key, child, assignment, failure):
                continue
            self._finish(key, child, state, info)

    def _keep_waiting_alive(self) -> None:
        now = self._clock()
        stale = [
            key
            for key, pending in self._waiting.items()
            if now - max(pending.since, pending.kept_alive_at) >= KEEP_WAITING_ALIVE_EVERY_S
        ]
        if not stale:
            return
        try:
            from airflow.utils.session import create_session

            with create_session(scoped=False) as session:
                refresh_queued_dttm(session, [self._assignments[key].ti_id for key in stale])
        except Exception:
            log.exception("Could not refresh queued_dttm of %d waiting tasks", len(stale))
            return
        for key in stale:
            self._waiting[key].kept_alive_at = now

    def _finish(self, key: TaskInstanceKey, child: Child, state: Any, info: Any) -> None:
        child.in_flight.discard(key)
        self.running.discard(key)
        self._assignments.pop(key, None)
        self.event_buffer[key] = (state, info)

    # -- fallback --------------------------------------------------------------------------------------------

    def _fallback_candidates(self, died_on: Child, failure: InfrastructureFailure) -> list[str]:
        """The children a run that died on ``died_on`` may go on on: after an out-of-memory, none whose memory
        size is no bigger (a task that overflowed to a bigger function would die again on a smaller one)."""
        if failure.reason != OUT_OF_MEMORY or died_on.max_memory_mb is None:
            return list(self._children)
        return [
            name
            for name, child in self._children.items()
            if child.max_memory_mb is None or child.max_memory_mb > died_on.max_memory_mb
        ]

    def _on_infrastructure_failure(
        self, key: TaskInstanceKey, child: Child, assignment: Assignment, failure: InfrastructureFailure
    ) -> bool:
        """Act on a run that died for infrastructure reasons. True when the FAILED must not be forwarded."""
        if assignment.decision is None:
            try:
                assignment.decision = self._decide_from_row(assignment.ti_id)
            except Exception:
                log.exception("Could not decide the fallback of adopted task %s", key)
        what = (key, child.name, failure.reason, failure.detail)
        log.warning("Run of %s on %s died for infrastructure reasons (%s: %s)", *what)
        next_step = decide_fallback(
            failure,
            failed_on=child.name,
            fallback=assignment.decision.fallback_lists() if assignment.decision else (),
            tried=assignment.tried,
            fallbacks_used=assignment.fallbacks_used,
            available=self._fallback_candidates(child, failure),
            mode=self.fallback_mode,
            max_fallbacks=self.max_fallbacks,
        )
        match next_step:
            case RerunSameTry(candidates=candidates):
                return self._rerun_same_try(key, child, assignment, failure, candidates)
            case RouteNextTry(route=route):
                self._next_try_routes.remember(key, route)
                metrics.count_fallback(child.name, route.executor, failure.reason)
                self._tell(key, assignment.log_path, audit.next_try_routed(route))
            case FallbacksExhausted():
                metrics.count_fallback_exhausted(child.name)
                self._tell(key, assignment.log_path, audit.fallback_exhausted(child.name, failure, next_step))
        return False

    def _rerun_same_try(
        self,
        key: TaskInstanceKey,
        child: Child,
        assignment: Assignment,
        failure: InfrastructureFailure,
        candidates: tuple[str, ...],
    ) -> bool:
        """Reset the try to QUEUED to wait for the first of ``candidates`` with room; False if it moved on."""
        try:
            workload = redispatch_same_try(assignment.ti_id, key.try_number, self.jwt_generator, failure.held)
        except Exception:
            log.exception("Could not reset %s for a fallback run; failing the try as reported", key)
            return False
        child.in_flight.discard(key)
        self.running.discard(key)
        if workload is None:
            # A run that never held the try must not fail it: another run of it holds it, or it moved on.
            where = "running or queued" if failure.held else "queued"
            log.warning("%s is no longer %s at try %s; not re-dispatching it", key, where, key.try_number)
            if not failure.held:
                self._assignments.pop(key, None)
            return not failure.held
        assignment.child = None
        assignment.fallbacks_used += 1
        self.queued_tasks[key] = workload
        # redispatch_same_try cleared the dead run's id in the database; this overrides any of its events.
        self.event_buffer[key] = (TaskInstanceState.QUEUED, router_held_id(key.try_number))
        self._waiting[key] = Pending(
            candidates=candidates,
            decision=assignment.decision,
            kind=PendingKind.FALLBACK,
            since=self._clock(),
            failure=failure,
            failed_on=child.name,
        )
        return True

    # -- scheduler services ----------------------------------------------------------------------------------

    def has_task(self, task_instance: TaskInstance) -> bool:
        # True from queueing until the current owner's final event, across any fallback hand-over; children
        # cannot answer this (LocalExecutor forgets a task once dispatched).
        return task_instance.key in self._assignments or super().has_task(task_instance)

    def revoke_task(self, *, ti: TaskInstance) -> None:
        """Forget a task (and ask its child to drop it); never raises, as the scheduler requires."""
        key = ti.key
        try:
            self.queued_tasks.pop(key, None)
            self._waiting.pop(key, None)
            self.running.discard(key)
            assignment = self._assignments.pop(key, None)
            if assignment is None or assignment.child is None:
                return
            child = self._children.get(assignment.child)
            if child is None:
                return
            child.in_flight.discard(key)
            child.executor.revoke_task(ti=ti)
        except NotImplementedError:
            log.info("Child executor of %s cannot revoke tasks; its later events for it are dropped", key)
        except Exception:
            log.exception("Revoking %s failed", key)

    def try_adopt_task_instances(self, tis: Sequence[TaskInstance]) -> Sequence[TaskInstance]:
        """Hand each task instance to the child named in its ``external_executor_id``, queue again the tries the
        dead router held (never handed to a child); return the rest, for the scheduler to reset."""
        adopted, held, not_adopted = offer_to_children(self._children, tis)
        for ti, child in adopted:
            key = ti.key
            self._assignments[key] = Assignment(
                ti_id=ti.id, decision=None, child=child.name, tried=[child.name]
            )
            child.in_flight.add(key)
            self.running.add(key)
        not_adopted += queue_again(held, self.jwt_generator, self._queue_task)
        if tis:
            log.info("Adopted %d of %d task instances", len(tis) - len(not_adopted), len(tis))
        return not_adopted

    def get_task_log(self, ti: TaskInstance, try_number: int) -> tuple[list[str], list[str]]:
        """What the child that ran this try adds to its log (the Lambda function's own log, say); never raises.

        The API server calls this on a router it built but never started: the child named in the task's
        ``external_executor_id`` is then built from the policy (not started), as Airflow builds executors there.
        """
        return read_child_log(ti, try_number, self._log_reader)

    def _log_reader(self, name: str) -> Child | None:
        if name in self._children:
            return self._children[name]
        if name not in self._log_readers:
            spec = self._ensure_policy().executors.get(name)
            self._log_readers[name] = (
                build_children({name: spec}, team_name=self.team_name)[name] if spec is not None else None
            )
        return self._log_readers[name]

    def debug_dump(self) -> None:
        super().debug_dump()
        for child in self._children.values():
            log.info("child %s: %d in flight, %d free", child.name, len(child.in_flight), child.free_slots())
            child.executor.debug_dump()

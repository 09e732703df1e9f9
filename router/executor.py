"""The RoutingExecutor: one Airflow executor that runs each task on the child executor its policy chooses.

The scheduler sees only this executor. For every queued task it asks the policy where the task should run,
hands the workload to that child (or to the first overflow child with room, or keeps it waiting, ordered by
priority, until one has room), forwards the children's events, and after an infrastructure failure reported by
a child hands the same try to the next fallback executor (see ``fallback.py``).

Every decision is visible three ways: a line in the task's own log, the child's name at the front of the task
instance's ``external_executor_id``, and an audit row in Airflow's ``log`` table, plus a metric per executor
and per rule.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from airflow.executors import workloads
from airflow.executors.base_executor import PARALLELISM, BaseExecutor
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.state import TaskInstanceState

from hybrid_router.router import audit, metrics
from hybrid_router.router.children import Child, build_children, instantiate_child
from hybrid_router.router.external_id import join_child_id, split_child_id
from hybrid_router.router.fallback import (
    NEXT_TRY,
    SAME_TRY,
    NextTryRoute,
    NextTryRoutes,
    redispatch_same_try,
    refresh_queued_dttm,
)
from hybrid_router.router.policy.facts import EXECUTOR_CONFIG_SECTION
from hybrid_router.router.task_timeouts import ExecutionTimeouts

if TYPE_CHECKING:
    from airflow.executors.workloads import ExecutorWorkload
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy.orm import Session

    from hybrid_router.child_protocol import InfrastructureFailure
    from hybrid_router.router.config import RouterConfig
    from hybrid_router.router.policy import Decision, Policy

# A workload that waited in the router longer than this gets a new execution-API token before it is handed to a
# child: its token lives only ``[scheduler] task_queued_timeout`` from when the scheduler made it.
TOKEN_REFRESH_AFTER_S = 60.0
# A task waiting in the router is QUEUED in the database; the scheduler's stuck-in-queued check (``[scheduler]
# task_queued_timeout``, 600 s by default) would revoke and finally fail it. Its ``queued_dttm`` is moved on
# every this many seconds while it waits, so lack of room never fails a task.
KEEP_WAITING_ALIVE_EVERY_S = 60.0

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


class _WithExternalId:
    """A task instance as its child knows it: the child's own external id, without the router's prefix."""

    def __init__(self, ti: Any, external_executor_id: str | None) -> None:
        self._ti = ti
        self.external_executor_id = external_executor_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ti, name)


@dataclass
class Pending:
    """A task waiting inside the router for one of ``candidates`` to have room."""

    candidates: tuple[str, ...]
    decision: Decision | None  # None only for an adopted task whose decision could not be made again
    kind: str = "routed"  # "routed" | "fallback" | "next_try"
    since: float = 0.0
    failure: InfrastructureFailure | None = None
    failed_on: str | None = None
    announced_wait: bool = False
    kept_alive_at: float = 0.0


@dataclass
class Assignment:
    """Which child owns a key now, and what is left to try should it die there."""

    ti_id: Any
    decision: Decision | None  # None for a task adopted after a restart until it is needed again
    child: str | None = None  # None while waiting for a fallback executor with room
    tried: list[str] = field(default_factory=list)
    fallbacks_used: int = 0
    log_path: str | None = None


class RoutingExecutor(BaseExecutor):
    """Routes each task to a child executor by policy, with overflow, fallback and adoption.

    Set ``[core] executor = hybrid_router.router.RoutingExecutor`` (or give it an alias in Airflow's executor
    list) and ``[hybrid_router] policy_file``. The constructor reads nothing and starts nothing: the API server
    and ``airflow dags test`` also build executors. ``policy``, ``config`` and ``children`` may be passed in
    (tests, embedding); otherwise ``start()`` reads ``[hybrid_router]`` and builds the children.

    ``[core] parallelism`` bounds what the scheduler hands the router, counted honestly: tasks running on a
    child, tasks prefetched into a child's queue and tasks waiting in the router's queue. Set it above the
    children's ``max_concurrency`` plus ``prefetch`` added up so that the router can keep its queue of one
    more wave (see ``slots_available``); LocalExecutor alone is not bound by it in Airflow 3.3.2 because it
    never fills its ``running`` set.

    Prefetch (policy ``executors.<name>.prefetch``; by default ``max_concurrency`` for LocalExecutor, 0 for
    any other executor): the router learns that a child's task ended only at its next heartbeat, one scheduler
    loop later, while a LocalExecutor worker that is done takes the next task from its own queue at once. So
    a child may hold up to ``prefetch`` tasks beyond ``max_concurrency``; its workers (``max_concurrency`` of
    them) still bound what runs at once. A prefetched task has left the router: it no longer overflows, is no
    longer reordered by priority, and starts when a worker of that child is free. Hence the router prefers any
    candidate with a free slot (overflow included) to a prefetch, and prefetches only behind tasks whose
    policy ``expected_duration`` is at most a fifth of ``[scheduler] task_queued_timeout``, which a waiting
    workload's token and the stuck-in-queued check both live by. Should the scheduler die, tasks prefetched
    into a LocalExecutor child's queue are left to its orphaned workers, as a bare LocalExecutor's backlog
    is; ``prefetch: 0`` keeps every waiting task in the router instead.
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(parallelism=parallelism, team_name=team_name)
        self._policy = policy
        self._config = config
        self._children: dict[str, Child] = children or {}
        self._history = history
        self._clock = clock
        self._waiting: dict[TaskInstanceKey, Pending] = {}
        self._assignments: dict[TaskInstanceKey, Assignment] = {}
        self._next_try = NextTryRoutes()
        self._timeouts = ExecutionTimeouts()
        self._audit = audit.AuditLog()
        self._audit_enabled = True
        self._policy_stamp: tuple[int, int] | None = None
        self._next_reload_at = float("inf")
        self._started = False
        self._log_readers: dict[str, BaseExecutor | None] = {}
        self._prefetch_behind_at_most_s = 600.0 / 5  # set from [scheduler] task_queued_timeout by start()

    # -- start / stop ----------------------------------------------------------------------------------------

    def _ensure_policy(self) -> Policy:
        if self._config is None and self._policy is None:
            from hybrid_router.router.config import RouterConfig

            self._config = RouterConfig.from_airflow_conf()
        if self._policy is None:
            self._policy = self._load_policy_file()
            self._policy_stamp = self._file_stamp()
        return self._policy

    def start(self) -> None:
        self._ensure_policy()
        if self._config is not None:
            self._audit_enabled = self._config.audit_log
            self._next_reload_at = self._clock() + float(self._config.reload_interval)
            if self._history is None and self._config.history_enabled:
                self._history = self._build_history()
        if not self._children:
            self._children = build_children(self._policy.executors, team_name=self.team_name)
        for child in self._children.values():
            child.executor.job_id = self.job_id
            child.executor.callback_sink = self.callback_sink
            child.executor.start()
        self.supports_callbacks = any(c.executor.supports_callbacks for c in self._children.values())
        self.supports_connection_test = any(
            c.executor.supports_connection_test for c in self._children.values()
        )
        self._prefetch_behind_at_most_s = self._task_queued_timeout_s() / 5
        self._started = True
        log.info(
            "RoutingExecutor started with children %s, fallback mode %s",
            ", ".join(
                f"{c.name}={type(c.executor).__name__}(limit {c.limit}, prefetch {c.prefetch})"
                for c in self._children.values()
            ),
            self.fallback_mode,
        )

    @staticmethod
    def _task_queued_timeout_s() -> float:
        from airflow.configuration import conf

        return conf.getfloat("scheduler", "task_queued_timeout", fallback=600.0)

    def end(self) -> None:
        self._for_each_child("end", lambda c: c.executor.end())
        self._flush_audit()

    def terminate(self) -> None:
        self._for_each_child("terminate", lambda c: c.executor.terminate())
        self._flush_audit()

    def _for_each_child(self, what: str, action: Callable[[Child], Any]) -> None:
        # One child failing to stop must not leave the others running.
        for child in self._children.values():
            try:
                action(child)
            except Exception:
                log.exception("%s() of child executor %s failed", what, child.name)

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

    def _load_policy_file(self) -> Any:
        from hybrid_router.router.policy import load_policy

        return load_policy(self._config.policy_file)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._config.policy_file)
        except (OSError, AttributeError, TypeError):
            return None
        return st.st_mtime_ns, st.st_size

    def reload_policy(self) -> bool:
        """Load the policy file again if it changed; keep the last good policy when the new one is bad."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._policy_stamp:
            return False
        self._policy_stamp = stamp
        try:
            policy = self._load_policy_file()
        except Exception as err:
            issues = getattr(err, "issues", None)
            log.error(
                "Policy reload from %s failed; routing goes on with the last good policy: %s%s",
                self._config.policy_file,
                err,
                "".join(f"\n  {issue}" for issue in issues) if issues else "",
            )
            return False
        if dict(policy.executors) != dict(self._policy.executors):
            log.error(
                "Policy reload from %s changes the executors section; that takes a scheduler restart. "
                "Routing goes on with the last good policy.",
                self._config.policy_file,
            )
            return False
        self._policy = policy
        log.info("Policy reloaded from %s", self._config.policy_file)
        return True

    def _maybe_reload_policy(self) -> None:
        now = self._clock()
        if now < self._next_reload_at:
            return
        self._next_reload_at = now + float(self._config.reload_interval)
        self.reload_policy()

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
        next_try = self._next_try.take(key)
        try:
            decision = self.decide(workload, session)
        except Exception as err:
            self._reject(workload, err)
            return
        if next_try is not None and next_try.executor in self._children:
            pending = Pending(
                candidates=(next_try.executor, *next_try.remaining),
                decision=decision,
                kind="next_try",
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
            execution_timeout_s = self._timeouts.get(session, ti_dto.dag_version_id, ti_dto.task_id)
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

        return self._policy.decide(resolve_facts(**facts, history=self._history))

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
        message = f"hybrid_router: cannot route this task: {err}"
        log.error("Cannot route %s: %s", key, err)
        audit.write_task_log_line(workload.log_path, message, level="error")
        if self._audit_enabled:
            self._audit.record("hybrid_router.route_error", key, error=str(err))
        self.event_buffer[key] = (TaskInstanceState.FAILED, message)

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
        """Room in ``child``'s own queue, open only while every task it holds is expected to end soon.

        A prefetched task waits in the child behind the tasks it already runs, out of the router's reach: its
        token and the scheduler's stuck-in-queued clock both run ``[scheduler] task_queued_timeout``. So a
        task is prefetched only behind tasks whose policy ``expected_duration`` is at most a fifth of that.
        """
        if child.prefetch <= 0:
            return 0
        for key in child.in_flight:
            assignment = self._assignments.get(key)
            decision = assignment.decision if assignment else None
            if decision is None or decision.expected_duration_s > self._prefetch_behind_at_most_s:
                return 0
        return child.prefetch_slots()

    def _dispatch_waiting(self) -> set[str]:
        """Hand waiting tasks, highest priority first, to the first candidate with room. Returns children used.

        A candidate that can start the task now wins over one that would hold it in its queue (prefetch), so
        a task overflows to an executor with a free slot rather than wait in its first choice's queue.
        """
        if not self._waiting:
            return set()
        free = {name: child.free_slots() for name, child in self._children.items()}
        # Measured on first need only, after this pass's earlier dispatches joined the children's in_flight.
        queue_room: dict[str, int] | None = None
        used: set[str] = set()
        for key, workload in self.order_queued_tasks_by_priority():
            pending = self._waiting[key]
            target = next((name for name in pending.candidates if free.get(name, 0) > 0), None)
            if target is not None:
                free[target] -= 1
            else:
                if queue_room is None:
                    queue_room = {name: self._prefetch_room(child) for name, child in self._children.items()}
                target = next((name for name in pending.candidates if queue_room.get(name, 0) > 0), None)
                if target is None:
                    if not pending.announced_wait:
                        pending.announced_wait = True
                        self._announce_wait(key, workload, pending)
                    continue
                queue_room[target] -= 1
            self._dispatch(key, workload, pending, target)
            used.add(target)
        return used

    def _announce_wait(self, key: TaskInstanceKey, workload: workloads.ExecuteTask, pending: Pending) -> None:
        names = ", ".join(pending.candidates) or "(none configured)"
        log.info("No room for %s on %s; it waits in the router", key, names)
        metrics.count_waiting(pending.candidates[0] if pending.candidates else "none")
        audit.write_task_log_line(
            workload.log_path, f"hybrid_router: waiting for a free slot on {names}; the task is not dropped"
        )

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
        message, extra = self._describe(pending, target)
        del self.queued_tasks[key]
        del self._waiting[key]
        try:
            child.executor.queue_workload(strip_router_keys(workload), None)
        except Exception as err:
            # A child that refuses a workload outright (not a capacity matter) would refuse it again: fail
            # the task with the reason rather than stall the scheduler loop or retry forever.
            log.exception("Child executor %s refused %s", target, key)
            self._assignments.pop(key, None)
            self._reject(workload, RuntimeError(f"executor '{target}' refused the task: {err}"))
            return
        audit.write_task_log_line(workload.log_path, message)
        child.in_flight.add(key)
        self.running.add(key)
        assignment.child = target
        assignment.tried.append(target)
        # Written now, not when the child reports RUNNING: a task must be adoptable by its child's name even
        # if the scheduler dies before the child says anything.
        self.event_buffer[key] = (TaskInstanceState.QUEUED, join_child_id(target, None))
        if self._audit_enabled:
            event = audit.EVENT_FALLBACK if pending.kind == "fallback" else audit.EVENT_ROUTED
            self._audit.record(event, key, **extra)
        if pending.kind == "fallback":
            metrics.count_fallback(pending.failed_on or "unknown", target, pending.failure.reason)
        else:
            metrics.count_routed(target, pending.decision.rule)
            if pending.candidates and target != pending.candidates[0]:
                metrics.count_overflow(pending.candidates[0], target)
        log.info("%s -> %s (%s)", key, target, extra.get("how"))

    def _describe(self, pending: Pending, target: str) -> tuple[str, dict[str, Any]]:
        """The task-log line and the audit row's details for one dispatch."""
        decision = pending.decision
        if pending.kind == "fallback":
            failure = pending.failure
            extra: dict[str, Any] = {
                "executor": target,
                "rule": decision.rule if decision else None,
                "rule_index": decision.rule_index if decision else None,
                "how": "fallback",
                "failed_on": pending.failed_on,
                "reason": failure.reason,
                "detail": failure.detail,
                "waited_s": round(self._clock() - pending.since, 3),
            }
            detail = f": {failure.detail}" if failure.detail else ""
            message = (
                f"hybrid_router: FALLBACK - the run on executor '{pending.failed_on}' died "
                f"({failure.reason}{detail}); the same try runs again on executor '{target}'. "
                "The lines below are from that new run."
            )
            return message, extra
        overflow_from = pending.candidates[0] if target != pending.candidates[0] else None
        how = "next_try" if pending.kind == "next_try" else ("overflow" if overflow_from else "policy")
        # The decision as the policy made it, then what happened: the executor that took the task.
        extra = {**decision.to_dict(), "executor": target, "how": how, "overflow_from": overflow_from}
        if pending.kind == "next_try":
            message = (
                f"hybrid_router: routed to executor '{target}' because the previous try died on "
                f"'{pending.failed_on}' for infrastructure reasons (fallback mode next_try)"
            )
        else:
            message = f"hybrid_router: routed to executor '{target}' by rule '{decision.rule}'"
            if overflow_from:
                message += f", overflow from '{overflow_from}' which had no free slot"
            if decision.reasons:
                message += "; " + "; ".join(decision.reasons)
        return message, extra

    # -- heartbeat -------------------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        if self._config is not None:
            self._maybe_reload_policy()
        self._dispatch_waiting()
        self._emit_metrics(self.slots_available, len(self.running), len(self.queued_tasks))
        self.sync()

    def sync(self) -> None:
        """Heartbeat every child, forward its events, and hand on the tries that died for infrastructure reasons."""
        for child in self._children.values():
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
            metrics.gauge_child(child.name, in_flight=len(child.in_flight), free=child.free_slots())
        metrics.gauge_waiting(len(self._waiting))
        self._flush_audit()

    @staticmethod
    def _drain(rows: Any) -> list[Any]:
        drained = []
        while rows:
            drained.append(rows.popleft())
        return drained

    def _flush_audit(self) -> None:
        self._audit.flush()

    def _heartbeat_child(self, child: Child) -> None:
        # The catch-all boundary: one broken child must not stop the others or the scheduler loop.
        try:
            child.executor.heartbeat()
        except Exception:
            log.exception("Heartbeat of child executor %s failed", child.name)

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
                self.event_buffer[key] = (state, join_child_id(child.name, info))
                continue
            if state == TaskInstanceState.FAILED:
                failure = child.pop_infrastructure_failure(key)
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

    def _on_infrastructure_failure(
        self, key: TaskInstanceKey, child: Child, assignment: Assignment, failure: InfrastructureFailure
    ) -> bool:
        """Handle a run that died for infrastructure reasons. True when the FAILED must not be forwarded."""
        if assignment.decision is None:
            try:
                assignment.decision = self._decide_from_row(assignment.ti_id)
            except Exception:
                log.exception("Could not decide the fallback of adopted task %s", key)
        decision = assignment.decision
        remaining = tuple(
            name
            for name in (decision.fallback if decision else ())
            if name in self._children and name not in assignment.tried
        )
        log.warning(
            "Run of %s on %s died for infrastructure reasons (%s: %s)",
            key,
            child.name,
            failure.reason,
            failure.detail,
        )
        if self.fallback_mode == NEXT_TRY:
            if remaining:
                self._next_try.remember(
                    key,
                    NextTryRoute(remaining[0], remaining[1:], failed_on=child.name, reason=failure.reason),
                )
                metrics.count_fallback(child.name, remaining[0], failure.reason)
                audit.write_task_log_line(
                    assignment.log_path,
                    f"hybrid_router: the run on executor '{child.name}' died ({failure.reason}); this try fails "
                    f"and the next try, if the task has retries left, runs on executor '{remaining[0]}'",
                    level="warning",
                )
                if self._audit_enabled:
                    self._audit.record(
                        audit.EVENT_NEXT_TRY_ROUTED,
                        key,
                        failed_on=child.name,
                        reason=failure.reason,
                        next_executor=remaining[0],
                    )
            return False
        if not remaining or assignment.fallbacks_used >= self.max_fallbacks:
            why = (
                "no fallback executor left"
                if not remaining
                else f"max_fallbacks ({self.max_fallbacks}) reached"
            )
            metrics.count_fallback_exhausted(child.name)
            audit.write_task_log_line(
                assignment.log_path,
                f"hybrid_router: the run on executor '{child.name}' died ({failure.reason}: {failure.detail}); "
                f"{why}, so the try fails",
                level="error",
            )
            if self._audit_enabled:
                self._audit.record(
                    audit.EVENT_FALLBACK_EXHAUSTED, key, failed_on=child.name, reason=failure.reason, why=why
                )
            return False
        try:
            workload = redispatch_same_try(assignment.ti_id, key.try_number, self.jwt_generator)
        except Exception:
            log.exception("Could not reset %s for a fallback run; failing the try as reported", key)
            return False
        if workload is None:
            log.warning(
                "%s is no longer running or queued at try %s; not re-dispatching it", key, key.try_number
            )
            return False
        child.in_flight.discard(key)
        self.running.discard(key)
        assignment.child = None
        assignment.fallbacks_used += 1
        self.queued_tasks[key] = workload
        self._waiting[key] = Pending(
            candidates=remaining,
            decision=decision,
            kind="fallback",
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
        """Hand each task instance to the child named in its ``external_executor_id``; return the rest."""
        by_child: dict[str, list[tuple[TaskInstance, str]]] = {}
        not_adopted: list[TaskInstance] = []
        for ti in tis:
            name, child_info = split_child_id(ti.external_executor_id)
            if name in self._children:
                by_child.setdefault(name, []).append((ti, ti.external_executor_id))
                ti.external_executor_id = child_info
            else:
                not_adopted.append(ti)
        for name, items in by_child.items():
            child = self._children[name]
            offered = [ti for ti, _ in items]
            try:
                refused = {id(ti) for ti in child.executor.try_adopt_task_instances(offered)}
            except Exception:
                log.exception("Child executor %s failed to adopt task instances", name)
                refused = {id(ti) for ti in offered}
            for ti, original in items:
                ti.external_executor_id = original
                if id(ti) in refused:
                    not_adopted.append(ti)
                    continue
                key = ti.key
                self._assignments[key] = Assignment(ti_id=ti.id, decision=None, child=name, tried=[name])
                child.in_flight.add(key)
                self.running.add(key)
        if tis:
            log.info("Adopted %d of %d task instances", len(tis) - len(not_adopted), len(tis))
        return not_adopted

    def get_task_log(self, ti: TaskInstance, try_number: int) -> tuple[list[str], list[str]]:
        """What the child that ran the task adds to its log (the Lambda function's own log, say); never raises.

        The API server calls this on a router it built but never started: the child named in the task's
        ``external_executor_id`` is then built from the policy (not started), as Airflow builds executors there.
        """
        name, child_info = split_child_id(getattr(ti, "external_executor_id", None))
        if name is None:
            return [], []
        try:
            reader = self._log_reader(name)
            if reader is None:
                return [], []
            return reader.get_task_log(_WithExternalId(ti, child_info), try_number)
        except Exception as err:
            log.exception("Reading the log of %s from executor %s failed", ti, name)
            return [], [f"hybrid_router: executor '{name}' could not read its log: {err}"]

    def _log_reader(self, name: str) -> BaseExecutor | None:
        if name in self._children:
            return self._children[name].executor
        if name not in self._log_readers:
            spec = self._ensure_policy().executors.get(name)
            self._log_readers[name] = (
                instantiate_child(
                    name,
                    spec.class_path,
                    max_concurrency=spec.max_concurrency,
                    options=spec.options,
                    team_name=self.team_name,
                )
                if spec is not None
                else None
            )
        return self._log_readers[name]

    def debug_dump(self) -> None:
        super().debug_dump()
        for child in self._children.values():
            log.info("child %s: %d in flight, %d free", child.name, len(child.in_flight), child.free_slots())
            child.executor.debug_dump()

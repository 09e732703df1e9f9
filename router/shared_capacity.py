"""Concurrency that several schedulers share (a Lambda function's): counted across schedulers, handed out under a lock.

Each scheduler's router has its own children, but a child may draw on a pool that other schedulers' children draw
on too (``child_protocol.SharedConcurrency``: a Lambda function's concurrency is one pool for the account, and Lambda
queues the events past it instead of refusing them). Such a child's room is the pool's limit minus the pool's runs
in flight everywhere: this router's, from its own memory, and every other scheduler's, counted in the metadata
database (task instances QUEUED or RUNNING whose external id is a hand-over to a child of the pool or one of the
pool's run ids, and other schedulers' tasks that ended moments ago, whose run may still be finishing).

The estimate the router routes by is counted at most once a second (``room``). A hand-over to a pool is exact
(``hand_over``): the router records hand-overs before any child gets them (``adoption.record_hand_overs``), and for
a pool it does so in the transaction that counted the pool again under the pool's lock (a PostgreSQL advisory
lock), so two schedulers never both hand out the pool's last slot. A task the pool has no room for then stays in
the router and goes to an overflow executor at the next pass, instead of waiting in Lambda's queue. How to set the
limits: docs/tuning.md ("Several schedulers").
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.utils.state import TaskInstanceState

from hybrid_router.child_protocol import LIKE_ESCAPE, SharedConcurrency, SharesConcurrency, like_literal
from hybrid_router.router.adoption import record_hand_overs, write_hand_overs
from hybrid_router.router.external_id import TRY_MARK

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from hybrid_router.router.children import Child

log = logging.getLogger(__name__)

# How old the count behind ``room`` may be: about one scheduler heartbeat, so one query per heartbeat at most.
COUNT_EVERY_S = 1.0
# A run's slot is free only once its handler has sent the result and returned, after the task reported its end to
# Airflow: another scheduler's task counts this long after its end_date. This router's own runs count until their
# result arrives.
RUN_END_GRACE_S = 5.0
# end_date has no index, last_heartbeat_at has: a task that ended lately showed life (its /run, a heartbeat) lately.
RECENT_HEARTBEAT_S = 300.0
# A scheduler waits this long at most for another's hand-over transaction; then its tasks wait a heartbeat.
LOCK_TIMEOUT_MS = 5000
# The first key of the pools' advisory locks (pg_advisory_xact_lock(int4, int4)): this project's, not another's.
LOCK_SCOPE = 0x68725343
IN_FLIGHT_STATES = (TaskInstanceState.QUEUED, TaskInstanceState.RUNNING)


@dataclass
class Pool:
    """One shared pool as this router sees it: its limit and the children of this router that draw on it."""

    key: str
    limit: int
    patterns: set[str] = field(default_factory=set)  # LIKE patterns of the external ids of the pool's runs
    children: list[Child] = field(default_factory=list)

    def own_in_flight(self) -> int:
        """This router's tasks on the pool: handed over and not finished (the router's own, exact count)."""
        return sum(len(child.in_flight) for child in self.children)

    def prefetch(self) -> int:
        """How many tasks past the pool's room this router's children may hold, each invoking them only as the
        pool has room (a LambdaExecutor child's prefetch)."""
        return sum(max(child.prefetch, 0) for child in self.children)

    def tell_children(self, others: int) -> None:
        """Tell each child how many of the pool's runs other schedulers have, so that it invokes what it holds
        only within what they leave."""
        for child in self.children:
            note = getattr(child.executor, "note_others_in_flight", None)
            if note is None:
                continue
            try:
                note(others)
            except Exception as err:
                log.error(
                    "note_others_in_flight() of executor %s failed: %s", child.name, child.error_text(err)
                )


def pools_of(children: Mapping[str, Child]) -> dict[str, Pool]:
    """The shared pools of the children that are up and know theirs (a Lambda child knows it once started)."""
    pools: dict[str, Pool] = {}
    for child in children.values():
        shared = _shared_concurrency(child)
        if shared is None:
            continue
        pool = pools.setdefault(shared.key, Pool(shared.key, shared.limit))
        # Two children on one function with different limits (per-child options): the tighter one holds.
        pool.limit = min(pool.limit, shared.limit)
        pool.patterns.update(shared.external_id_patterns)
        # Every scheduler's router names its children alike (one configuration): its hand-overs are `<child>@<try>`.
        pool.patterns.add(f"{like_literal(child.name)}{TRY_MARK}%")
        pool.children.append(child)
    return pools


def _shared_concurrency(child: Child) -> SharedConcurrency | None:
    if not child.available or not isinstance(child.executor, SharesConcurrency):
        return None
    try:
        return child.executor.shared_concurrency()
    except Exception as err:
        log.error("shared_concurrency() of executor %s failed: %s", child.name, child.traceback_text(err))
        return None


def count_runs(session: Session, pools: Mapping[str, Pool], *, job_id: int, now: datetime) -> dict[str, int]:
    """Per pool, the task instances not queued by scheduler job ``job_id`` that hold or may still hold one of its
    slots. One query, whatever the number of pools."""
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import and_, case, func, or_, select

    if not pools:
        return {}
    ti = TaskInstance.__table__
    matches = {
        key: or_(*(ti.c.external_executor_id.like(p, escape=LIKE_ESCAPE) for p in sorted(pool.patterns)))
        for key, pool in pools.items()
    }
    ended_since = now - timedelta(seconds=RUN_END_GRACE_S)
    ended_lately = and_(
        ti.c.last_heartbeat_at >= ended_since - timedelta(seconds=RECENT_HEARTBEAT_S),
        ti.c.end_date >= ended_since,
    )
    query = select(*(func.sum(case((match, 1), else_=0)) for match in matches.values())).where(
        or_(ti.c.state.in_(IN_FLIGHT_STATES), ended_lately),
        or_(ti.c.queued_by_job_id.is_(None), ti.c.queued_by_job_id != job_id),
        or_(*matches.values()),
    )
    row = session.execute(query).one()
    return {key: int(value or 0) for key, value in zip(matches, row, strict=True)}


def lock_id(key: str) -> int:
    """A pool's advisory lock key: a stable signed 32-bit number (every scheduler must compute the same)."""
    value = zlib.crc32(key.encode("utf-8"))
    return value - (1 << 32) if value >= 1 << 31 else value


def lock_pools(session: Session, keys: Sequence[str]) -> None:
    """Hold each pool's lock until the transaction ends, taken in one order by every scheduler.

    PostgreSQL only: SQLite allows one scheduler and one writing transaction at a time anyway.
    """
    from sqlalchemy import text

    if not keys or session.get_bind().dialect.name != "postgresql":
        return
    session.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))
    for key in sorted(keys):
        session.execute(
            text("SELECT pg_advisory_xact_lock(:scope, :pool)"), {"scope": LOCK_SCOPE, "pool": lock_id(key)}
        )


def _utcnow() -> datetime:
    from airflow._shared.timezones import timezone

    return timezone.utcnow()


def _new_session() -> AbstractContextManager[Session]:
    from airflow.utils.session import create_session

    # Its own session and transaction: never the scheduler's scoped one.
    return create_session(scoped=False)


class SharedLimits:
    """The shared pools of one router's children: their room now, and hand-overs that respect it.

    ``session`` opens a session that commits when its block ends; ``clock`` times the counts, ``utcnow`` is
    compared with the database's end dates. Without a scheduler job (tests, benchmarks) nothing is shared.
    """

    def __init__(
        self,
        children: Mapping[str, Child],
        *,
        session: Callable[[], AbstractContextManager[Session]] = _new_session,
        clock: Callable[[], float] = time.monotonic,
        utcnow: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._children = children
        self._session = session
        self._clock = clock
        self._utcnow = utcnow
        self._others: dict[str, int] = {}  # per pool, other schedulers' runs at the last count
        self._counted_at: float | None = None
        self._count_failing = False

    def _job_id(self) -> int | None:
        return next(
            (c.executor.job_id for c in self._children.values() if c.executor.job_id is not None), None
        )

    def others_in_flight(self, pool_key: str) -> int | None:
        """Other schedulers' runs on the pool at the last count (no query); None before a count that worked."""
        return self._others.get(pool_key)

    def room(self, child: Child) -> int | None:
        """How many more tasks ``child`` may be handed as far as its shared pool goes; None: no shared bound."""
        pools = pools_of(self._children)
        pool = next((p for p in pools.values() if any(c is child for c in p.children)), None)
        job_id = self._job_id()
        if pool is None or job_id is None:
            return None
        if self._counted_at is None or self._clock() - self._counted_at >= COUNT_EVERY_S:
            self._count(pools, job_id)
        others = self._others.get(pool.key)
        if others is None:
            return None  # the count failed (logged): the child's own bounds hold alone until it works again
        return max(pool.limit - others - pool.own_in_flight(), 0)

    def _count(self, pools: Mapping[str, Pool], job_id: int) -> None:
        self._counted_at = self._clock()
        try:
            with self._session() as session:
                self._others = count_runs(session, pools, job_id=job_id, now=self._utcnow())
            self._tell_children(pools)
        except Exception as err:
            self._others = {}
            if not self._count_failing:
                log.warning("Could not count the runs of %s across schedulers: %s", ", ".join(pools), err)
            self._count_failing = True
            return
        if self._count_failing:
            log.info("Counting the runs of %s across schedulers again", ", ".join(pools))
        self._count_failing = False

    def _tell_children(self, pools: Mapping[str, Pool]) -> None:
        for key, pool in pools.items():
            pool.tell_children(self._others.get(key, 0))

    def hand_over(
        self, chosen: MutableSequence[tuple[Any, ...]], hand_overs: Sequence[tuple[Any, str, int]]
    ) -> bool:
        """Record ``hand_overs`` (``adoption.write_hand_overs``'s, one per item of ``chosen``, each item ending with
        its target child's name), no more to a pool than it has room for now across schedulers; the others are
        removed from ``chosen`` and keep waiting. False when nothing could be recorded (logged): every task then
        waits for the next heartbeat."""
        pools = pools_of(self._children)
        pool_of = {child.name: pool for pool in pools.values() for child in pool.children}
        involved = {pool_of[item[-1]].key for item in chosen if item[-1] in pool_of}
        job_id = self._job_id()
        if not involved or job_id is None:
            return record_hand_overs(hand_overs)
        try:
            with self._session() as session:
                lock_pools(session, sorted(involved))
                others = count_runs(session, pools, job_id=job_id, now=self._utcnow())
                room = {
                    key: pool.limit + pool.prefetch() - others[key] - pool.own_in_flight()
                    for key, pool in pools.items()
                }
                kept = []
                for index, item in enumerate(chosen):
                    pool = pool_of.get(item[-1])
                    if pool is not None:
                        if room[pool.key] <= 0:
                            continue
                        room[pool.key] -= 1
                    kept.append(index)
                write_hand_overs(session, [hand_overs[index] for index in kept])
        except Exception:
            log.exception(
                "Could not record which child takes %d tasks; they wait for the next heartbeat",
                len(hand_overs),
            )
            return False
        self._others, self._counted_at = others, self._clock()
        self._tell_children(pools)
        if len(kept) < len(chosen):
            log.info(
                "%d tasks stay in the router: %s full across schedulers",
                len(chosen) - len(kept),
                ", ".join(f"{key} ({pools[key].limit} runs at once)" for key in sorted(involved)),
            )
        chosen[:] = [chosen[index] for index in kept]
        return True


def hand_over(
    children: Mapping[str, Child], chosen: MutableSequence[tuple[Any, ...]], assignments: Mapping[Any, Any]
) -> bool:
    """Record which child takes each task of ``chosen`` (``(key, ..., child name)``; ``assignments[key].ti_id``
    its task instance) as ``adoption.record_hand_overs`` does, within the room of the shared pools when a child
    draws on one (``SharedLimits.hand_over``: tasks it has no room for are removed from ``chosen``)."""
    hand_overs = [(assignments[item[0]].ti_id, item[-1], item[0].try_number) for item in chosen]
    limits = next((c.shared_limits for c in children.values() if c.shared_limits is not None), None)
    if limits is None:
        return record_hand_overs(hand_overs)
    return limits.hand_over(chosen, hand_overs)


def link_shared_limits(children: Mapping[str, Child]) -> None:
    """Give the children that may share a pool with other schedulers' one ``SharedLimits`` to ask for room."""
    sharing = [child for child in children.values() if isinstance(child.executor, SharesConcurrency)]
    if sharing:
        limits = SharedLimits(children)
        for child in sharing:
            child.shared_limits = limits

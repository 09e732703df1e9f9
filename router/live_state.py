"""Each scheduler's router publishes what it holds now (tasks in flight and waiting, per child) for the Routing page.

One row per scheduler in a table of the router's own, ``hybrid_router_live_state``, defined here on its own
``MetaData`` (no Airflow migration: the first router that publishes creates it). The row is written on the
router's heartbeat at most once per interval, in a short session of its own, and deleted when the router stops;
a scheduler that died keeps its row, which the page shows with its age, until any publisher deletes rows older
than a day. Publishing never raises into the scheduler loop: a database error is logged and tried again later.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.models.base import metadata as airflow_metadata
from airflow.utils.sqlalchemy import UtcDateTime
from sqlalchemy import Column, Integer, MetaData, String, Table, Text, delete, insert, inspect, select, update
from sqlalchemy.exc import DBAPIError

from hybrid_router.redaction import error_text
from hybrid_router.router.shared_capacity import Pool, pools_of

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    from hybrid_router.router.children import Child
    from hybrid_router.router.waiting import Pending

log = logging.getLogger(__name__)

TABLE_NAME = "hybrid_router_live_state"
DEFAULT_EVERY_S = 1.0
# Rows of schedulers that stopped publishing this long ago are deleted, by any publisher, once an hour at most.
STALE_AFTER = timedelta(days=1)
CLEANUP_EVERY_S = 3600.0
# While the database refuses the row, the error is logged this often at most (it is tried every interval).
ERROR_LOG_EVERY_S = 60.0

# Airflow's schema (``[database] sql_alchemy_schema``) and naming convention, but not its MetaData: Airflow's
# migrations and ``airflow db`` commands must not see this table.
metadata = MetaData(schema=airflow_metadata.schema, naming_convention=airflow_metadata.naming_convention)
live_state_table = Table(
    TABLE_NAME,
    metadata,
    Column("scheduler", String(250), primary_key=True),
    Column("hostname", String(250), nullable=False),
    Column("job_id", Integer, nullable=True),
    Column("published_at", UtcDateTime, nullable=False),
    Column("state", Text, nullable=False),
)


@dataclass(frozen=True)
class LiveState:
    """One scheduler's row: who published it, when (timezone-aware, UTC), and its snapshot."""

    scheduler: str
    hostname: str
    job_id: int | None
    published_at: datetime
    state: dict[str, Any]


def scheduler_key(job_id: int | None, hostname: str, pid: int) -> str:
    """A scheduler's row key: its scheduler job, or its process when the router runs without one."""
    return f"job-{job_id}" if job_id is not None else f"{hostname}:{pid}"


def table_exists(connection: Connection) -> bool:
    return inspect(connection).has_table(TABLE_NAME, schema=metadata.schema)


def read_live_states(session: Session) -> list[LiveState]:
    """Every scheduler's row, by scheduler key; [] before any router has created the table."""
    # Checked, not tried: a failed SELECT would abort the caller's transaction on PostgreSQL.
    if not table_exists(session.connection()):
        return []
    t = live_state_table
    rows = session.execute(select(t).order_by(t.c.scheduler)).all()
    return [
        LiveState(
            scheduler=row.scheduler,
            hostname=row.hostname,
            job_id=row.job_id,
            published_at=row.published_at,
            state=_parse_state(row.state),
        )
        for row in rows
    ]


def _parse_state(text: str | None) -> dict[str, Any]:
    try:
        state = json.loads(text or "{}")
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


# -- the snapshot -------------------------------------------------------------------------------------------


def router_snapshot(children: Mapping[str, Child], waiting: Collection[Pending]) -> dict[str, Any]:
    """What the router holds now: tasks waiting in it for room, and per child its figures and shared pool.

    A waiting task counts on its first candidate. No query: a shared pool's runs on other schedulers are those
    of the router's last count (at most a second old while tasks go to the pool), null before any count.
    """
    first_choice = Counter(p.candidates[0] for p in waiting if p.candidates)
    pool_of = {child.name: pool for pool in pools_of(children).values() for child in pool.children}
    return {
        "waiting": len(waiting),
        "executors": [
            {
                "name": child.name,
                "class": type(child.executor).__name__,
                "available": child.available,
                "in_flight": len(child.in_flight),
                "limit": child.limit,
                "free": child.free_slots(),
                "waiting": first_choice.get(child.name, 0),
                "pool": _pool_figures(pool_of.get(child.name)),
            }
            for child in children.values()
        ],
    }


def _pool_figures(pool: Pool | None) -> dict[str, Any] | None:
    if pool is None:
        return None
    limits = pool.children[0].shared_limits
    others = limits.others_in_flight(pool.key) if limits is not None else None  # the last count: no query
    in_flight = None if others is None else others + pool.own_in_flight()
    return {"key": pool.key, "limit": pool.limit, "in_flight": in_flight}


# -- publishing ---------------------------------------------------------------------------------------------


def _new_session() -> AbstractContextManager[Session]:
    from airflow.utils.session import create_session

    # Its own session and transaction: never the scheduler's scoped one.
    return create_session(scoped=False)


def _utcnow() -> datetime:
    from airflow._shared.timezones import timezone

    return timezone.utcnow()


def _hostname() -> str:
    from airflow.utils.net import get_hostname

    return get_hostname()


class LiveStatePublisher:
    """Writes one scheduler's row at most once per ``every_s`` seconds (0: never) and deletes it on ``withdraw``.

    ``session`` opens a session that commits when its block ends; ``clock`` paces the writes, ``utcnow`` stamps
    them. ``publish`` and ``withdraw`` never raise.
    """

    def __init__(
        self,
        every_s: float = DEFAULT_EVERY_S,
        *,
        session: Callable[[], AbstractContextManager[Session]] = _new_session,
        clock: Callable[[], float] = time.monotonic,
        utcnow: Callable[[], datetime] = _utcnow,
        hostname: Callable[[], str] = _hostname,
        pid: Callable[[], int] = os.getpid,
    ) -> None:
        if every_s < 0:
            raise ValueError(f"every_s must be >= 0 seconds (0 turns publishing off), got {every_s}")
        self.every_s = every_s
        self._session = session
        self._clock = clock
        self._utcnow = utcnow
        self._hostname_of = hostname
        self._pid = pid
        self._hostname: str | None = None
        self._table_ready = False
        self._key: str | None = None  # the key of the row this publisher wrote last
        self._last_try: float | None = None
        self._cleaned_at: float | None = None
        self._error_logged_at: float | None = None
        self._failing = False

    @classmethod
    def from_config(cls, config: Any, *, clock: Callable[[], float] = time.monotonic) -> LiveStatePublisher:
        """The publisher ``[hybrid_router] live_state_interval`` asks for (``RouterConfig``); a configuration
        made by hand without that option (tests, embedding) publishes nothing."""
        return cls(getattr(config, "live_state_interval", 0.0), clock=clock)

    @property
    def enabled(self) -> bool:
        return self.every_s > 0

    def publish(
        self, snapshot: Mapping[str, Any] | Callable[[], Mapping[str, Any]], *, job_id: int | None = None
    ) -> bool:
        """Write ``snapshot`` (or what it returns: built only when due) as this scheduler's row, if due.

        True when the row was written now; False when not due, turned off, or the database refused it (logged:
        tried again after ``every_s``).
        """
        now = self._clock()
        if not self.enabled or (self._last_try is not None and now - self._last_try < self.every_s):
            return False
        self._last_try = now
        try:
            state = snapshot() if callable(snapshot) else snapshot
            self._write(json.dumps(state, sort_keys=True, default=str), job_id, now)
        except Exception as err:
            self._failed("publish the router's live state", err)
            return False
        if self._failing:
            log.info("Publishing the router's live state again")
            self._failing = False
            self._error_logged_at = None
        return True

    def withdraw(self) -> None:
        """Delete this scheduler's row (the router is stopping); never raises."""
        if self._key is None:
            return
        try:
            with self._session() as session:
                session.execute(delete(live_state_table).where(live_state_table.c.scheduler == self._key))
        except Exception as err:
            log.warning("Could not delete the router's live state row %s: %s", self._key, error_text(err, ()))
            return
        self._key = None

    def _write(self, state: str, job_id: int | None, now: float) -> None:
        if not self._table_ready:
            self._create_table()
        if self._hostname is None:
            self._hostname = self._hostname_of()
        key = scheduler_key(job_id, self._hostname, self._pid())
        published_at = self._utcnow()
        t = live_state_table
        values = {"hostname": self._hostname, "job_id": job_id, "published_at": published_at, "state": state}
        with self._session() as session:
            if self._key is not None and self._key != key:
                # The scheduler's job id became known after the first row was written under the process's key.
                session.execute(delete(t).where(t.c.scheduler == self._key))
            # One writer per key (one scheduler): update, or insert the first time, is an upsert on any database.
            if session.execute(update(t).where(t.c.scheduler == key).values(**values)).rowcount == 0:
                session.execute(insert(t).values(scheduler=key, **values))
            cleanup_due = self._cleaned_at is None or now - self._cleaned_at >= CLEANUP_EVERY_S
            if cleanup_due:
                session.execute(delete(t).where(t.c.published_at < published_at - STALE_AFTER))
        self._key = key
        if cleanup_due:
            self._cleaned_at = now

    def _create_table(self) -> None:
        try:
            with self._session() as session:
                live_state_table.create(session.connection(), checkfirst=True)
        except DBAPIError:
            # Another scheduler created it between the check and the CREATE (PostgreSQL): fine if it is there.
            with self._session() as session:
                if not table_exists(session.connection()):
                    raise
        self._table_ready = True

    def _failed(self, what: str, err: Exception) -> None:
        now = self._clock()
        if self._error_logged_at is None or now - self._error_logged_at >= ERROR_LOG_EVERY_S:
            log.warning(
                "Could not %s (tried again every %gs, logged once a minute while it fails): %s",
                what,
                self.every_s,
                error_text(err, ()),
            )
            self._error_logged_at = now
        self._failing = True

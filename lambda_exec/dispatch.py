"""Dispatch bookkeeping: one record per Lambda run of a task try, and the book of the ones an executor owns.

The scheduler thread creates, changes and retires dispatches; the reader threads only ask the book whether a
message's dispatch is current, retired or unknown (hence its lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, ValuesView
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache

from hybrid_router.lambda_exec.config import LAMBDA_MAX_TIMEOUT_S

if TYPE_CHECKING:
    from airflow.models.taskinstancekey import TaskInstanceKey

# Results for finished or revoked dispatches are recognised (and deleted) for this long.
RETIRED_DISPATCH_TTL_S = 6 * 3600 + LAMBDA_MAX_TIMEOUT_S
RETIRED_DISPATCH_MAX = 200_000
# Jittered exponential back-off after a 429 or a 5xx, capped by throttle_backoff_max.
BACKOFF_INITIAL_S = 0.5
BACKOFF_CAP_S = 20.0
BACKOFF_JITTER_S = 1.0


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
    # The run (delivered copy of the event) bound to this dispatch: None until one claimed the task; "" for a
    # handler older than run ids (``runs.py``).
    run_id: str | None = None
    other_runs: set[str] = field(default_factory=set)  # runs whose results were ignored (each logged once)
    # When a copy reported EVENT_EXPIRED while no run was bound: the event can start no run any more.
    expired_seen_at: float | None = None
    # The heartbeat in which RUNNING (with the bound run's id) was reported; a final state waits for the next.
    running_beat: int | None = None
    # The bound run's lease (``liveness``): it stops itself once it could send no STARTED for ``lease_s`` (0: it
    # made no such promise); ``renewed_at``: when this executor took its last STARTED.
    lease_s: float = 0.0
    renewed_at: float | None = None


class Ownership(str, Enum):
    CURRENT = "current"  # a dispatch of this executor that is still in flight
    RETIRED = "retired"  # finished, revoked or superseded here lately: its messages change nothing
    UNKNOWN = "unknown"  # another executor's, or one a future adopter will own


class DispatchBook(Mapping["TaskInstanceKey", Dispatch]):
    """The current dispatch of each task this executor holds, by task key, and the ones retired lately."""

    def __init__(self, clock: Callable[[], float], on_retire: Callable[[Dispatch], None] | None = None):
        self._clock = clock
        self._on_retire = on_retire  # told of each retired dispatch, under the book's lock
        self._lock = threading.Lock()
        self._by_key: dict[TaskInstanceKey, Dispatch] = {}
        self._by_id: dict[str, Dispatch] = {}
        self._retired: TTLCache[str, float] = TTLCache(RETIRED_DISPATCH_MAX, RETIRED_DISPATCH_TTL_S)

    def __getitem__(self, key: TaskInstanceKey) -> Dispatch:
        return self._by_key[key]

    def __iter__(self) -> Iterator[TaskInstanceKey]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def values(self) -> ValuesView[Dispatch]:
        return self._by_key.values()  # the dict's own view: walked every heartbeat

    def register(self, dispatch: Dispatch) -> None:
        """Make ``dispatch`` its task's current one; the one it replaces is retired."""
        with self._lock:
            previous = self._by_key.get(dispatch.key)
            if previous is not None:
                self._retire_locked(previous)
            self._by_key[dispatch.key] = dispatch
            self._by_id[dispatch.dispatch_id] = dispatch

    def retire(self, dispatch: Dispatch) -> None:
        """Forget ``dispatch`` (and cancel an invoke not started yet); its late messages are recognised."""
        with self._lock:
            self._retire_locked(dispatch)

    def _retire_locked(self, dispatch: Dispatch) -> None:
        self._by_id.pop(dispatch.dispatch_id, None)
        if dispatch.future is not None:
            dispatch.future.cancel()
        if self._by_key.get(dispatch.key) is dispatch:
            del self._by_key[dispatch.key]
        self._retired[dispatch.dispatch_id] = self._clock()
        if self._on_retire is not None:
            self._on_retire(dispatch)

    def current(self, dispatch_id: str) -> Dispatch | None:
        """Scheduler thread: the dispatch with this id, if it is still current."""
        return self._by_id.get(dispatch_id)

    def ownership(self, dispatch_id: str) -> Ownership:
        """Reader threads: whether a message for ``dispatch_id`` is this executor's to act on."""
        with self._lock:
            if dispatch_id in self._by_id:
                return Ownership.CURRENT
            if dispatch_id in self._retired:
                return Ownership.RETIRED
        return Ownership.UNKNOWN

    def has_work_in_flight(self) -> bool:
        return bool(self._by_id)


def backoff_delay(attempt: int, cap: float) -> float:
    """Jittered exponential back-off for the ``attempt``-th refused invoke (tenacity's strategy, not our own)."""
    from tenacity import RetryCallState, wait_exponential_jitter

    wait = wait_exponential_jitter(
        multiplier=BACKOFF_INITIAL_S, max=min(cap, BACKOFF_CAP_S), jitter=BACKOFF_JITTER_S
    )
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait(state))

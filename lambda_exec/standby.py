"""Invokes that wait for a run of the function to end, and go the moment one does.

The executor keeps at most the function's concurrency in flight: an event invoked past it is throttled by Lambda
and tried again only after 1 s, then 2 s, ... (AWS's retry interval for throttled async events). A task it holds
beyond that waits for a slot. Without this module the slot is filled at the scheduler's next heartbeat, which
comes up to a scheduler loop later (``scheduler_idle_sleep_time``, 1 s by default, when the loop had nothing to
do): for short tasks, as long as the task itself.

So the scheduler thread leaves the sealed events of the tasks that wait here (``refill``), and the reader thread
that delivers a run's end launches the oldest of them at once (``slot_freed``): the run that ended gave its slot
to the next, as a LocalExecutor worker that is done takes the next task from its queue. The scheduler thread
takes the launched invokes into its dispatches at its next heartbeat (``take_launched``), and withdraws a waiting
event whose dispatch it retires (``withdraw``). Nothing else changes hands between the threads, and only through
this object's lock: a launch replaces a run that ended, so it never raises what this executor has in flight.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

# Runs whose end freed a slot lately, so that a result delivered twice frees it once.
_FREED_REMEMBERED = 4096


class Standby:
    """The events ready to be invoked when a slot frees, and the invokes launched that way.

    ``launch(payload)`` sends one invoke and returns its future (it runs on the reader thread, under the lock).
    An event sealed more than ``max_age_s`` ago (by ``clock``) is not launched: the scheduler thread seals it again
    at its next heartbeat, so that its not_after counts from about when it goes.
    """

    def __init__(
        self, launch: Callable[[str], Future[Any]], *, clock: Callable[[], float], max_age_s: float
    ) -> None:
        self._launch = launch
        self._clock = clock
        self._max_age_s = max_age_s
        # Re-entrant: the scheduler thread may retire a dispatch (``withdraw``) while it holds the standby.
        self._lock = threading.RLock()
        # dispatch id -> (sealed event, when it was sealed), first to go first
        self._waiting: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._launched: dict[str, Future[Any]] = {}  # dispatch id -> its invoke, until the scheduler takes it
        self._freed_by: OrderedDict[str, None] = OrderedDict()  # run ids whose end freed a slot
        self.launches = 0  # how many invokes went out this way (a counter for metrics and tests)

    # -- scheduler thread --------------------------------------------------------------------------------------

    @contextmanager
    def held(self) -> Iterator[Standby]:
        """No launch while the scheduler thread counts what is in flight and refills."""
        with self._lock:
            yield self

    def take_launched(self) -> dict[str, Future[Any]]:
        """The invokes launched since the last call, by dispatch id. Call inside ``held``."""
        launched, self._launched = self._launched, {}
        return launched

    def refill(self, events: Sequence[tuple[str, str, float]]) -> None:
        """Replace the waiting events with ``events`` ((dispatch id, sealed event, when sealed), first to go
        first). Call inside ``held``."""
        self._waiting = OrderedDict(
            (dispatch_id, (event, sealed_at)) for dispatch_id, event, sealed_at in events
        )

    def withdraw(self, dispatch_id: str) -> None:
        """Forget a dispatch the scheduler thread retired: its event waits no more; an invoke launched for it and
        not taken yet is cancelled if it has not gone out (if it has, its run finds its try gone)."""
        with self._lock:
            self._waiting.pop(dispatch_id, None)
            future = self._launched.pop(dispatch_id, None)
        if future is not None:
            future.cancel()

    def clear(self) -> None:
        with self._lock:
            self._waiting.clear()

    def __len__(self) -> int:
        return len(self._waiting)

    # -- reader threads ----------------------------------------------------------------------------------------

    def slot_freed(self, run_id: str) -> str | None:
        """A run of this executor's ended (``run_id`` names it): launch the oldest waiting event. Returns its
        dispatch id, or None when none waits or this run's end freed its slot already."""
        with self._lock:
            if run_id:
                if run_id in self._freed_by:
                    return None
                self._freed_by[run_id] = None
                if len(self._freed_by) > _FREED_REMEMBERED:
                    self._freed_by.popitem(last=False)
            too_old = self._clock() - self._max_age_s
            while self._waiting:
                dispatch_id, (event, sealed_at) = self._waiting.popitem(last=False)
                if sealed_at < too_old:
                    continue  # left to the scheduler thread, which seals it again
                self._launched[dispatch_id] = self._launch(event)
                self.launches += 1
                return dispatch_id
            return None

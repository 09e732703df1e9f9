"""What the LambdaExecutor tests share besides the fakes: the signing secret and the loop that heartbeats."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

SECRET = "unit-test-secret"


def drive(
    executor: Any, until: Callable[[dict[Any, Any]], bool], timeout: float = 10.0, interval: float = 0.02
):
    """Heartbeat ``executor`` until ``until(events)`` holds; ``events`` accumulates the event buffer (last wins)."""
    events: dict[Any, Any] = {}
    deadline = time.monotonic() + timeout
    while True:
        executor.heartbeat()
        events.update(executor.get_event_buffer())
        if until(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; events so far: {events}")
        time.sleep(interval)

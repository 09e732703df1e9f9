"""Fixtures for the LambdaExecutor tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

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


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left behind: {leaked}"

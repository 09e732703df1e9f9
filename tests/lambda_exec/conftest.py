"""Fixtures for the Lambda path's tests: the LambdaExecutor and the in-Lambda handler."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest


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


@pytest.fixture
def results_queue(moto_server: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh results queue on moto, and this process's AWS settings pointed at it as a Lambda sandbox's
    would be (the handler's boto3 reads them from the environment)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto_server.url)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return moto_server.new_queue("results")[0]

"""The function's concurrency as the Lambda executor describes it to its router: one pool every scheduler shares."""

from __future__ import annotations

import sqlite3
import time

import pytest

from hybrid_router.child_protocol import LIKE_ESCAPE, SharedConcurrency
from hybrid_router.lambda_exec.capacity import shared_concurrency
from hybrid_router.lambda_exec.executor import LambdaExecutor
from hybrid_router.lambda_exec.external_id import lambda_external_id

from .executor_support import SECRET
from .fakes import FakeLambda, FakeSqs, client_error, fake_clients


def like(value: str, pattern: str) -> bool:
    """SQL's own LIKE, as the router's count runs it."""
    with sqlite3.connect(":memory:") as db:
        return bool(db.execute("SELECT ? LIKE ? ESCAPE ?", (value, pattern, LIKE_ESCAPE)).fetchone()[0])


def test_the_pool_is_the_functions_whatever_the_qualifier_and_needs_a_known_limit():
    assert shared_concurrency("airflow-task", None) is None
    pool = shared_concurrency("airflow-task", 3)
    assert (pool.key, pool.limit) == ("lambda:airflow-task", 3)


@pytest.mark.parametrize(
    ("external_id", "counted"),
    [
        (lambda_external_id("fn_a", "req-1", "d1"), True),  # the executor alone
        (lambda_external_id("fn_a", "", "d1"), True),  # before Lambda answered the invoke
        ("lambda@1|" + lambda_external_id("fn_a", "req-1", "d1", "run-1"), True),  # behind a router's id
        (lambda_external_id("fnXa", "req-1", "d1"), False),  # `_` is no wildcard
        (lambda_external_id("fn_a-10g", "req-1", "d1"), False),  # a function whose name starts alike
        ("local@1", False),
    ],
)
def test_the_patterns_match_the_runs_of_this_function_only(external_id, counted):
    (pattern,) = shared_concurrency("fn_a", 2).external_id_patterns
    assert like(external_id, pattern) is counted


def started_executor(lambda_: FakeLambda, **options) -> LambdaExecutor:
    executor = LambdaExecutor(
        parallelism=16,
        clock=time.time,
        clients=fake_clients(lambda_, FakeSqs()),
        function_name="airflow-task",
        results_queue_url="http://sqs.local/results",
        signing_secret=SECRET,
        aws_conn_id="",
        poll_wait_seconds=0,
        **options,
    )
    executor.start()
    return executor


@pytest.mark.parametrize(
    ("lambda_", "options", "limit"),
    [
        (FakeLambda(reserved=3), {}, 3),  # GetFunctionConcurrency
        (FakeLambda(reserved=3), {"reserved_concurrency": 5}, 5),  # the setting wins: no call needed
        (
            FakeLambda(),
            {},
            None,
        ),  # no reserved concurrency: nothing to share, parallelism bounds each executor
    ],
)
def test_the_executor_shares_its_functions_limit_once_started(lambda_, options, limit):
    executor = started_executor(lambda_, **options)
    try:
        shared = executor.shared_concurrency()
        assert (shared.limit if shared else None) == limit
        assert executor.free_capacity() == (limit or 16)
    finally:
        executor.terminate()


def test_an_unreadable_reserved_concurrency_shares_nothing():
    denied = FakeLambda(reserved=3)
    denied.failing["get_function_concurrency"] = client_error(
        "AccessDeniedException", 403, operation="GetFunctionConcurrency"
    )
    executor = started_executor(denied)
    try:
        assert executor.shared_concurrency() is None
    finally:
        executor.terminate()


def test_shared_concurrency_is_a_frozen_value():
    with pytest.raises(AttributeError):
        shared_concurrency("fn", 1).limit = 2  # type: ignore[misc]
    assert isinstance(shared_concurrency("fn", 1), SharedConcurrency)


def test_tasks_it_holds_are_invoked_only_within_the_slots_other_schedulers_leave():
    from .executor_support import drive
    from .test_executor_unit import make_workload

    lambda_ = FakeLambda()
    executor = started_executor(lambda_, reserved_concurrency=3)
    try:
        executor.note_others_in_flight(2)  # the router counted two runs of the function elsewhere
        for index in range(3):
            executor.queue_workload(make_workload(f"t{index}"), session=None)
        drive(executor, lambda _: len(lambda_.invokes) >= 1)
        for _ in range(5):
            executor.heartbeat()
        assert len(lambda_.invokes) == 1
        executor.note_others_in_flight(0)  # they ended
        drive(executor, lambda _: len(lambda_.invokes) == 3)
    finally:
        executor.terminate()

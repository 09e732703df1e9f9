"""The RoutingExecutor against fake children: routing, overflow, waiting, fallback, adoption, revoke, stop."""

from __future__ import annotations

import contextlib
import json
import time
from types import SimpleNamespace

import pytest
from airflow.utils.state import TaskInstanceState
from router_fakes import CapacityChild, DyingChild, FakeChild, QueueingChild

from devtools.workloads import make_workload
from hybrid_router.router import executor as executor_module
from hybrid_router.router.children import Child
from hybrid_router.router.executor import RoutingExecutor
from hybrid_router.router.external_id import join_child_id, parse_external_id, router_held_id, split_child_id
from hybrid_router.router.policy import load_policy

POLICY = """
version: 1
executors:
  lambda: {class: router_fakes.DyingChild, max_concurrency: 2, limits: {max_duration: 15m}}
  local_a: {class: router_fakes.FakeChild, max_concurrency: 2}
  local_b: {class: router_fakes.FakeChild, max_concurrency: 1}
defaults: {expected_duration: 1m, memory_mb: 512, run_on: local_a}
settings: {fallback_mode: %(mode)s, max_fallbacks: %(max_fallbacks)s}
rules:
  - name: to lambda
    if: {queue: lambda}
    run_on: lambda
    overflow: [local_a]
    fallback: [local_b, local_a]
  - name: to b
    if: {queue: b}
    run_on: local_b
    overflow: [local_a]
  - name: everything else
    run_on: local_a
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_router(write_policy, clock, audit_rows, task_log_folder):
    def make(mode: str = "same_try", max_fallbacks: int = 2, **child_overrides) -> RoutingExecutor:
        policy = load_policy(write_policy(POLICY % {"mode": mode, "max_fallbacks": max_fallbacks}))
        fakes = {
            "lambda": DyingChild(parallelism=2, label="lambda"),
            "local_a": FakeChild(parallelism=2, label="a"),
            "local_b": FakeChild(parallelism=1, label="b"),
            **child_overrides,
        }
        children = {
            name: Child(name, fake, max_concurrency=policy.executors[name].max_concurrency)
            for name, fake in fakes.items()
        }
        router = RoutingExecutor(parallelism=32, policy=policy, children=children, clock=clock)
        router.start()
        return router

    return make


def fake(router: RoutingExecutor, name: str):
    return router.children[name].executor


def events(router: RoutingExecutor) -> dict:
    return router.get_event_buffer()


def test_routes_each_task_to_its_rules_executor_and_says_so(
    make_router, audit_rows, counters, task_log_folder
):
    router = make_router()
    to_lambda = make_workload("short", queue="lambda", log_path="dag/short/attempt=1.log")
    to_b = make_workload("other", queue="b", log_path="dag/other/attempt=1.log")
    to_a = make_workload("plain")
    for workload in (to_lambda, to_b, to_a):
        router.queue_workload(workload, session=None)
    assert all(router.has_task(w.ti) for w in (to_lambda, to_b, to_a))

    router.heartbeat()

    assert [w.ti.task_id for w in fake(router, "lambda").dispatched] == ["short"]
    assert [w.ti.task_id for w in fake(router, "local_b").dispatched] == ["other"]
    assert [w.ti.task_id for w in fake(router, "local_a").dispatched] == ["plain"]
    buffer = events(router)
    # The child's RUNNING info comes through behind the child's name and the try: adoption reads it back.
    assert buffer[to_lambda.ti.key] == (TaskInstanceState.RUNNING, "lambda@1|lambda-run-short")
    assert buffer[to_b.ti.key] == (TaskInstanceState.RUNNING, "local_b@1|b-run-other")
    assert {row.event for row in audit_rows} == {"hybrid_router.routed"}
    routed = {row.task_id: json.loads(row.extra) for row in audit_rows}
    assert routed["short"]["executor"] == "lambda" and routed["short"]["rule"] == "to lambda"
    assert routed["plain"]["how"] == "policy"
    assert "hybrid_router.routed.lambda" in counters and "hybrid_router.rule.to_lambda" in counters
    line = json.loads((task_log_folder / "dag/short/attempt=1.log").read_text().splitlines()[0])
    assert "routed to executor 'lambda' by rule 'to lambda'" in line["event"]
    assert line["timestamp"]


def test_finished_events_reach_the_scheduler_and_release_the_task(make_router):
    router = make_router()
    workload = make_workload("plain")
    router.queue_workload(workload, session=None)
    router.heartbeat()
    events(router)
    fake(router, "local_a").finish(workload.ti.key, TaskInstanceState.SUCCESS)
    router.heartbeat()
    assert events(router) == {workload.ti.key: (TaskInstanceState.SUCCESS, None)}
    assert not router.has_task(workload.ti)
    assert router.children["local_a"].in_flight == set()


def test_router_only_executor_config_never_reaches_a_child(make_router):
    router = make_router()
    config = {"hybrid_router": {"expected_duration": "30s"}, "overrides": {"cpu": 1}}
    workload = make_workload("plain", executor_config=config)
    router.queue_workload(workload, session=None)
    router.heartbeat()
    (seen,) = fake(router, "local_a").dispatched
    assert seen.ti.executor_config == {"overrides": {"cpu": 1}}
    assert workload.ti.executor_config == config  # the scheduler's object is left alone


def test_full_target_overflows_to_the_first_overflow_executor_with_room(make_router, audit_rows, counters):
    router = make_router()
    first, second = make_workload("b1", queue="b"), make_workload("b2", queue="b")
    router.queue_workload(first, session=None)
    router.queue_workload(second, session=None)
    router.heartbeat()
    assert [w.ti.task_id for w in fake(router, "local_b").dispatched] == ["b1"]
    assert [w.ti.task_id for w in fake(router, "local_a").dispatched] == ["b2"]
    extra = {row.task_id: json.loads(row.extra) for row in audit_rows}
    assert extra["b2"]["how"] == "overflow" and extra["b2"]["overflow_from"] == "local_b"
    assert "hybrid_router.overflow.local_b.local_a" in counters


def test_child_free_capacity_counts_as_room(make_router):
    throttled = CapacityChild(parallelism=10, label="lambda", capacity=0)
    router = make_router(**{"lambda": throttled})
    router.queue_workload(make_workload("short", queue="lambda"), session=None)
    router.heartbeat()
    assert throttled.dispatched == []
    assert [w.ti.task_id for w in fake(router, "local_a").dispatched] == ["short"]


def test_no_room_anywhere_waits_in_priority_order_and_is_never_dropped(make_router, task_log_folder):
    router = make_router()
    workloads = [
        make_workload(f"t{p}", priority_weight=p, log_path=f"dag/t{p}/attempt=1.log") for p in (1, 5, 3, 4)
    ]
    for workload in workloads:
        router.queue_workload(workload, session=None)
    router.heartbeat()
    local_a = fake(router, "local_a")
    assert [w.ti.task_id for w in local_a.dispatched] == ["t5", "t4"]
    # lambda and local_b have 3 free slots between them; the router's queue (room for 2 + 2 + 1) holds 2.
    assert router.slots_available == 3 + (5 - 2)
    waiting = [w for w in workloads if w.ti.task_id in ("t1", "t3")]
    assert all(router.has_task(w.ti) for w in waiting)
    assert "waiting for a free slot on local_a" in (task_log_folder / "dag/t1/attempt=1.log").read_text()
    router.heartbeat()  # still no room: nothing changes, nothing fails
    assert len(local_a.dispatched) == 2 and not any(s == "failed" for s, _ in events(router).values())

    local_a.finish(local_a.dispatched[0].ti.key)
    router.heartbeat()  # the slot the finish frees is filled in the same heartbeat, by priority
    assert [w.ti.task_id for w in local_a.dispatched] == ["t5", "t4", "t3"]


def test_slots_available_is_the_childrens_free_slots_plus_room_in_the_routers_queue(make_router):
    router = make_router()
    limits = 2 + 2 + 1  # the queue holds one more wave of the children's limits
    assert router.slots_available == (2 + 2 + 1) + limits
    for i in range(3):
        router.queue_workload(make_workload(f"t{i}"), session=None)
    assert router.slots_available == 5 + (limits - 3)
    router.heartbeat()  # local_a takes two, one waits for it
    assert router.slots_available == (2 + 0 + 1) + (limits - 1)
    for i in range(20):
        router.queue_workload(make_workload(f"u{i}"), session=None)
    assert router.slots_available == 3  # a full queue never makes the count negative


def test_infrastructure_failure_hands_the_same_try_to_the_fallback(
    make_router, monkeypatch, audit_rows, counters
):
    router = make_router()
    workload = make_workload("short", queue="lambda", log_path="dag/short/attempt=1.log")
    fresh = make_workload("short", queue="lambda", log_path="dag/short/attempt=1.log").model_copy(
        update={"ti": workload.ti, "token": "fresh-token"}
    )
    resets = []

    def redispatch(ti_id, try_number, generator, running_too=True):
        resets.append((ti_id, try_number))
        return fresh

    monkeypatch.setattr(executor_module, "redispatch_same_try", redispatch)
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)
    router.queue_workload(workload, session=None)
    router.heartbeat()
    events(router)
    lambda_child, local_b = fake(router, "lambda"), fake(router, "local_b")

    lambda_child.die(workload.ti.key, "timeout", "Task timed out after 900.00 seconds")
    router.heartbeat()

    assert resets == [(workload.ti.id, 1)]
    assert [w.token for w in local_b.dispatched] == ["fresh-token"]
    assert router.has_task(workload.ti)
    # The fallback run starts in the same heartbeat; the scheduler learns its executor at once.
    assert events(router) == {workload.ti.key: (TaskInstanceState.QUEUED, "local_b@1")}
    router.heartbeat()
    assert events(router) == {workload.ti.key: (TaskInstanceState.RUNNING, "local_b@1|b-run-short")}
    # The dead run's late events are dropped: the try belongs to local_b now.
    lambda_child.finish(workload.ti.key, TaskInstanceState.FAILED)
    router.heartbeat()
    assert events(router) == {}
    local_b.finish(workload.ti.key, TaskInstanceState.SUCCESS)
    router.heartbeat()
    assert events(router) == {workload.ti.key: (TaskInstanceState.SUCCESS, None)}
    assert not router.has_task(workload.ti)

    fallback_rows = [json.loads(r.extra) for r in audit_rows if r.event == "hybrid_router.fallback"]
    assert fallback_rows == [
        {
            "detail": "Task timed out after 900.00 seconds",
            "executor": "local_b",
            "failed_on": "lambda",
            "how": "fallback",
            "reason": "timeout",
            "rule": "to lambda",
            "rule_index": 0,
            "waited_s": 0.0,
        }
    ]
    assert "hybrid_router.fallback.lambda.local_b" in counters
    assert "hybrid_router.fallback_reason.timeout" in counters
    lines = [json.loads(line)["event"] for line in _task_log(workload).splitlines()]
    assert lines[0].startswith("hybrid_router: routed to executor 'lambda'")
    assert "FALLBACK - the run on executor 'lambda' died (timeout" in lines[1]
    assert "runs again on executor 'local_b'" in lines[1]


def test_a_lambda_child_refused_for_its_credentials_hands_the_same_try_to_the_fallback(
    make_router, monkeypatch, audit_rows, counters
):
    # A real LambdaExecutor over scripted boto clients: expired credentials on Invoke, all the way past the bound.
    from hybrid_router.lambda_exec.executor import LambdaExecutor
    from tests.lambda_exec.fakes import FakeClock, FakeLambda, FakeSqs, client_error, fake_clients

    lambda_clock, lambda_api = FakeClock(), FakeLambda()
    expired = client_error(
        "ExpiredTokenException", 403, "The security token included in the request is expired"
    )
    lambda_api.answer(*[expired] * 10)
    lambda_child = LambdaExecutor(
        parallelism=2,
        clock=lambda_clock,
        clients=fake_clients(lambda_api, FakeSqs()),
        function_name="airflow-task",
        results_queue_url="http://sqs.local/results",
        signing_secret="router-test-secret",
        aws_conn_id="",
        poll_wait_seconds=0,
        throttle_backoff_max=30,
    )
    router = make_router(**{"lambda": lambda_child})
    workload = make_workload("short", queue="lambda")
    fresh = workload.model_copy(update={"token": "fresh-token"})
    resets = []
    monkeypatch.setattr(
        executor_module,
        "redispatch_same_try",
        lambda ti_id, try_number, *_: resets.append(try_number) or fresh,
    )
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)
    seen: list = []

    def heartbeat_after_invokes(count: int) -> None:
        deadline = time.monotonic() + 5
        while len(lambda_api.invokes) < count:
            assert time.monotonic() < deadline, f"expected {count} invokes, got {len(lambda_api.invokes)}"
            time.sleep(0.01)
        time.sleep(0.05)  # the pool thread hands its answer over
        router.heartbeat()
        seen.extend(events(router).values())

    try:
        router.queue_workload(workload, session=None)
        router.heartbeat()
        heartbeat_after_invokes(1)
        # While the credentials are refused the child has no room: a new task overflows to its rule's overflow.
        assert lambda_child.free_capacity() == 0 and router.children["lambda"].free_slots() == 0
        second = make_workload("second", queue="lambda")
        router.queue_workload(second, session=None)
        router.heartbeat()
        assert [w.ti.key for w in fake(router, "local_a").dispatched] == [second.ti.key]
        for attempt in (2, 3):
            lambda_clock.advance(21)
            router.heartbeat()
            heartbeat_after_invokes(attempt)

        # Past the bound: never started, so the same try runs on the fallback and no retry is spent.
        assert resets == [1]
        assert [w.token for w in fake(router, "local_b").dispatched] == ["fresh-token"]
        assert TaskInstanceState.FAILED not in [state for state, _ in seen]
        assert router.has_task(workload.ti) and len(lambda_api.invokes) == 3
        fallback_rows = [json.loads(r.extra) for r in audit_rows if r.event == "hybrid_router.fallback"]
        assert [(row["failed_on"], row["executor"], row["reason"]) for row in fallback_rows] == [
            ("lambda", "local_b", "credentials")
        ]
        assert "ExpiredTokenException" in fallback_rows[0]["detail"]
        assert "hybrid_router.fallback_reason.credentials" in counters
    finally:
        router.terminate()


def _task_log(workload) -> str:
    from hybrid_router.router.audit import task_log_file

    return task_log_file(workload.log_path).read_text()


def test_a_second_death_goes_to_the_next_fallback_until_max_fallbacks(make_router, monkeypatch):
    dying_b = DyingChild(parallelism=1, label="b")
    router = make_router(max_fallbacks=1, local_b=dying_b)
    workload = make_workload("short", queue="lambda")
    monkeypatch.setattr(executor_module, "redispatch_same_try", lambda *a: workload)
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)
    router.queue_workload(workload, session=None)
    router.heartbeat()
    fake(router, "lambda").die(workload.ti.key)
    router.heartbeat()
    events(router)
    dying_b.die(workload.ti.key, "out_of_memory")
    router.heartbeat()
    # max_fallbacks 1 is spent: the FAILED goes to the scheduler, which applies the task's retries.
    assert events(router) == {workload.ti.key: (TaskInstanceState.FAILED, None)}
    assert not router.has_task(workload.ti)
    assert fake(router, "local_a").dispatched == []


def test_a_failure_of_the_task_itself_is_never_a_fallback(make_router, monkeypatch):
    router = make_router()
    monkeypatch.setattr(executor_module, "redispatch_same_try", pytest.fail)
    workload = make_workload("short", queue="lambda")
    router.queue_workload(workload, session=None)
    router.heartbeat()
    events(router)
    fake(router, "lambda").finish(workload.ti.key, TaskInstanceState.FAILED)
    router.heartbeat()
    assert events(router) == {workload.ti.key: (TaskInstanceState.FAILED, None)}


def test_a_try_that_moved_on_is_not_re_dispatched(make_router, monkeypatch):
    router = make_router()
    monkeypatch.setattr(executor_module, "redispatch_same_try", lambda *a: None)
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)
    workload = make_workload("short", queue="lambda")
    router.queue_workload(workload, session=None)
    router.heartbeat()
    events(router)
    fake(router, "lambda").die(workload.ti.key)
    router.heartbeat()
    assert events(router) == {workload.ti.key: (TaskInstanceState.FAILED, None)}
    assert fake(router, "local_b").dispatched == []


def test_a_run_that_never_held_the_try_does_not_fail_it_when_another_run_holds_it(make_router, monkeypatch):
    # A copy that ended without claiming (its sibling claimed the try since): the reset of a QUEUED try
    # misses, and the FAILED must not reach the scheduler, which would fail the sibling's running try.
    router = make_router()
    calls = []
    monkeypatch.setattr(executor_module, "redispatch_same_try", lambda *a: calls.append(a) and None)
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)
    workload = make_workload("short", queue="lambda")
    router.queue_workload(workload, session=None)
    router.heartbeat()
    events(router)
    fake(router, "lambda").die(workload.ti.key, "unreported", "no /run answer", held=False)
    router.heartbeat()
    assert calls and calls[0][-1] is False  # reset only while QUEUED
    assert events(router) == {}
    assert not router.has_task(workload.ti)
    assert fake(router, "local_b").dispatched == []


def test_next_try_mode_fails_the_try_and_sends_the_next_try_to_the_fallback(
    make_router, audit_rows, counters
):
    router = make_router(mode="next_try")
    first = make_workload("short", queue="lambda", run_id="r1")
    router.queue_workload(first, session=None)
    router.heartbeat()
    events(router)
    fake(router, "lambda").die(first.ti.key)
    router.heartbeat()
    assert events(router) == {first.ti.key: (TaskInstanceState.FAILED, None)}

    other_run = make_workload("short", queue="lambda", run_id="r2", try_number=2)
    second = make_workload("short", queue="lambda", run_id="r1", try_number=2)
    router.queue_workload(other_run, session=None)
    router.queue_workload(second, session=None)
    router.heartbeat()
    assert [w.ti.key for w in fake(router, "local_b").dispatched] == [second.ti.key]
    assert [w.ti.key for w in fake(router, "lambda").dispatched] == [first.ti.key, other_run.ti.key]
    assert "hybrid_router.next_try_fallback" in {row.event for row in audit_rows}
    assert "hybrid_router.fallback.lambda.local_b" in counters


def test_adoption_hands_each_task_to_the_child_named_in_its_external_id(make_router):
    refusing = FakeChild(parallelism=2, label="a")
    refusing.try_adopt_task_instances = lambda tis: list(tis)  # like LocalExecutor: adopts nothing
    adopted_by_lambda = []
    router = make_router(local_a=refusing)
    fake(router, "lambda").try_adopt_task_instances = lambda tis: adopted_by_lambda.extend(tis) or []

    def ti(task_id, external):
        key = make_workload(task_id).ti.key
        return SimpleNamespace(
            id=task_id, key=key, state=TaskInstanceState.RUNNING, external_executor_id=external
        )

    on_lambda, on_a, unknown, none = (
        ti("x", "lambda|req-1"),
        ti("y", "local_a"),
        ti("z", "gone|1"),
        ti("w", None),
    )
    not_adopted = router.try_adopt_task_instances([on_lambda, on_a, unknown, none])

    assert [t.id for t in not_adopted] == ["z", "w", "y"]
    # The child saw its own id, and the stored id keeps the router's prefix.
    assert [t.id for t in adopted_by_lambda] == ["x"]
    assert on_lambda.external_executor_id == "lambda|req-1"
    assert router.has_task(on_lambda) and not router.has_task(on_a)
    fake(router, "lambda").finish(on_lambda.key)
    router.heartbeat()
    assert events(router)[on_lambda.key][0] == TaskInstanceState.SUCCESS


def test_external_id_round_trip():
    assert split_child_id(join_child_id("lambda", "abc|d@2", try_number=3)) == ("lambda", "abc|d@2")
    assert parse_external_id(join_child_id("lambda", "abc|d@2", try_number=3)) == ("lambda", 3, "abc|d@2")
    assert split_child_id(join_child_id("local", None, try_number=1)) == ("local", None)
    assert parse_external_id(router_held_id(2)) == (None, 2, None)
    assert split_child_id(None) == (None, None)
    # Written by the version before the try was recorded: still read, with no try (it may be any try's).
    assert parse_external_id("lambda|lambda:fn:req:d1") == ("lambda", None, "lambda:fn:req:d1")
    assert parse_external_id("local") == ("local", None, None)
    assert parse_external_id("local").is_for_try(5) and not parse_external_id("local@4").is_for_try(5)


def test_revoke_task_never_raises(make_router):
    class Exploding(FakeChild):
        def revoke_task(self, *, ti):
            raise RuntimeError("boom")

    router = make_router(local_a=Exploding(parallelism=2))
    running, waiting = make_workload("a"), make_workload("b", queue="b")
    router.queue_workload(running, session=None)
    router.heartbeat()
    events(router)
    router.queue_workload(waiting, session=None)
    router.revoke_task(ti=running.ti)
    router.revoke_task(ti=waiting.ti)
    router.revoke_task(ti=make_workload("never-seen").ti)
    assert not router.has_task(running.ti) and not router.has_task(waiting.ti)
    fake(router, "local_a").finish(running.ti.key)
    router.heartbeat()
    assert running.ti.key not in events(router)


def test_end_and_terminate_reach_every_child_even_if_one_fails(make_router):
    class Broken(FakeChild):
        def end(self):
            raise RuntimeError("boom")

        def terminate(self):
            raise RuntimeError("boom")

    router = make_router(local_a=Broken(parallelism=2))
    router.end()
    router.terminate()
    assert fake(router, "lambda").ended and fake(router, "local_b").ended
    assert fake(router, "lambda").terminated and fake(router, "local_b").terminated


def test_a_broken_child_heartbeat_does_not_stop_the_others(make_router):
    class Broken(FakeChild):
        def heartbeat(self):
            raise RuntimeError("boom")

    router = make_router(local_b=Broken(parallelism=1))
    workload = make_workload("plain")
    router.queue_workload(workload, session=None)
    router.heartbeat()
    assert events(router)[workload.ti.key][0] == TaskInstanceState.RUNNING


def test_children_task_event_logs_are_saved_by_the_router(make_router, audit_rows):
    from airflow.models import Log

    router = make_router()
    workload = make_workload("plain")
    fake(router, "local_a")._task_event_logs.append(Log(event="child said", task_instance=workload.ti.key))
    router.heartbeat()
    assert "child said" in {row.event for row in audit_rows}
    assert not fake(router, "local_a")._task_event_logs


def test_callbacks_are_refused_when_no_child_supports_them(make_router):
    from airflow.executors.workloads.callback import ExecuteCallback

    router = make_router()
    assert router.supports_callbacks is False
    with pytest.raises(NotImplementedError):
        router.queue_workload(ExecuteCallback.model_construct(), session=None)


def test_the_router_starts_its_children_and_reads_nothing_in_init(write_policy):
    router = RoutingExecutor()
    assert router.children == {} and router.policy is None


def test_a_task_the_policy_cannot_route_fails_with_the_reason(make_router, audit_rows, task_log_folder):
    router = make_router()
    workload = make_workload(
        "bad",
        executor_config={"hybrid_router": {"expected_duration": "soon"}},
        log_path="dag/bad/attempt=1.log",
    )
    router.queue_workload(workload, session=None)
    ((state, info),) = events(router).values()
    assert state == TaskInstanceState.FAILED and "expected_duration" in info
    assert "cannot route this task" in (task_log_folder / "dag/bad/attempt=1.log").read_text()
    assert not router.has_task(workload.ti)


class TestPolicyReload:
    @pytest.fixture
    def setup(self, write_policy, clock, audit_rows):
        path = write_policy(POLICY % {"mode": "same_try", "max_fallbacks": 2})
        config = SimpleNamespace(policy_file=path, reload_interval=5.0, audit_log=True, history_enabled=False)
        children = {
            name: Child(name, FakeChild(parallelism=2, label=name))
            for name in ("lambda", "local_a", "local_b")
        }
        router = RoutingExecutor(config=config, children=children, clock=clock)
        router.start()
        return router, path, clock

    def edit(self, path, old, new):
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new) + "\n# edited\n")

    def test_a_changed_file_is_loaded_at_the_next_reload_interval(self, setup):
        router, path, clock = setup
        before = router.policy
        self.edit(path, "if: {queue: b}", "if: {queue: c}")
        clock.now += 4.9
        router.heartbeat()
        assert router.policy is before  # not before reload_interval has passed
        clock.now += 0.1
        router.heartbeat()
        assert router.policy is not before
        workload = make_workload("x", queue="c")
        router.queue_workload(workload, session=None)
        router.heartbeat()
        assert [w.ti.task_id for w in fake(router, "local_b").dispatched] == ["x"]

    def test_a_broken_file_keeps_the_last_good_policy(self, setup, caplog):
        router, path, clock = setup
        good = router.policy
        path.write_text("version: 1\nexecutors: [not, a, mapping]\n")
        clock.now += 5
        router.heartbeat()
        assert router.policy is good
        assert "Policy reload from" in caplog.text and "last good policy" in caplog.text
        clock.now += 5
        router.heartbeat()  # the same broken file is not re-read (nor re-reported) until it changes again
        assert caplog.text.count("Policy reload from") == 1

    def test_a_reload_that_changes_the_executors_is_refused(self, setup, caplog):
        router, path, clock = setup
        good = router.policy
        self.edit(
            path,
            "local_b: {class: router_fakes.FakeChild, max_concurrency: 1}",
            "local_b: {class: LocalExecutor}",
        )
        clock.now += 5
        router.heartbeat()
        assert router.policy is good
        assert "changes the executors section" in caplog.text


def test_an_adopted_task_that_dies_falls_back_by_its_decision_made_again(make_router, monkeypatch):
    router = make_router()
    workload = make_workload("short", queue="lambda")
    lambda_child = fake(router, "lambda")
    lambda_child.try_adopt_task_instances = lambda tis: []
    ti = SimpleNamespace(
        id=workload.ti.id,
        key=workload.ti.key,
        state=TaskInstanceState.RUNNING,
        external_executor_id="lambda|req",
    )
    assert router.try_adopt_task_instances([ti]) == []
    monkeypatch.setattr(
        RoutingExecutor, "_decide_from_row", lambda self, ti_id: router.decide(workload) if ti_id else None
    )
    monkeypatch.setattr(executor_module, "redispatch_same_try", lambda *a: workload)
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)
    lambda_child.die(workload.ti.key)
    router.heartbeat()
    assert [w.ti.key for w in fake(router, "local_b").dispatched] == [workload.ti.key]
    assert router.has_task(workload.ti)


def test_a_child_that_refuses_a_workload_fails_that_task_only(make_router):
    class Refusing(FakeChild):
        def queue_workload(self, workload, session):
            raise ValueError("payload too large")

    router = make_router(local_b=Refusing(parallelism=1))
    refused, fine = make_workload("x", queue="b"), make_workload("y")
    router.queue_workload(refused, session=None)
    router.queue_workload(fine, session=None)
    router.heartbeat()
    buffer = events(router)
    state, info = buffer[refused.ti.key]
    assert (
        state == TaskInstanceState.FAILED and "executor 'local_b' refused the task: payload too large" in info
    )
    assert buffer[fine.ti.key][0] == TaskInstanceState.RUNNING
    assert not router.has_task(refused.ti)


def test_tasks_waiting_for_room_are_kept_clear_of_the_stuck_in_queued_timeout(
    make_router, monkeypatch, clock
):
    refreshed: list[list] = []
    monkeypatch.setattr(
        executor_module, "refresh_queued_dttm", lambda session, ids: refreshed.append(sorted(ids))
    )
    monkeypatch.setattr("airflow.utils.session.create_session", lambda scoped: contextlib.nullcontext())
    router = make_router()
    workloads = [make_workload(f"t{i}") for i in range(3)]  # local_a takes 2, one waits
    for workload in workloads:
        router.queue_workload(workload, session=None)
    router.heartbeat()
    clock.now += executor_module.KEEP_WAITING_ALIVE_EVERY_S - 1
    router.heartbeat()
    assert refreshed == []
    clock.now += 1
    router.heartbeat()
    assert refreshed == [[workloads[2].ti.id]]
    router.heartbeat()
    assert len(refreshed) == 1  # not again until another interval has passed
    clock.now += executor_module.KEEP_WAITING_ALIVE_EVERY_S
    router.heartbeat()
    assert len(refreshed) == 2


def test_callbacks_go_to_a_child_that_supports_them_and_their_events_come_back(make_router):
    import uuid
    from pathlib import Path as _Path

    from airflow.executors.workloads.base import BundleInfo
    from airflow.executors.workloads.callback import CallbackDTO, ExecuteCallback

    class CallbackChild(FakeChild):
        supports_callbacks = True

        def _process_workloads(self, workload_items):
            for workload in workload_items:
                self.queued_callbacks.pop(workload.key)
                self.dispatched.append(workload)

    child = CallbackChild(parallelism=2)
    router = make_router(local_b=child)
    assert router.supports_callbacks is True
    callback = ExecuteCallback(
        callback=CallbackDTO(id=str(uuid.uuid4()), fetch_method="import_path", data={"path": "x.y"}),
        dag_rel_path=_Path("dag.py"),
        token="t",
        log_path=None,
        bundle_info=BundleInfo(name="dags-folder"),
    )
    router.queue_workload(callback, session=None)
    assert not router.queued_callbacks  # the router keeps none itself
    router.heartbeat()
    assert child.dispatched == [callback]
    child.change_state(callback.key, "success")
    router.heartbeat()
    assert events(router) == {callback.key: ("success", None)}


class LogChild(FakeChild):
    def get_task_log(self, ti, try_number):
        return [f"{self.label} log for {ti.task_id} id={ti.external_executor_id}"], [f"try {try_number}"]


def test_task_log_comes_from_the_child_named_in_the_external_id_even_before_start(write_policy):
    policy = load_policy(
        write_policy(
            "version: 1\nexecutors:\n  lam: {class: router_fakes.FakeChild}\n"
            f"  logs: {{class: {__name__}.LogChild}}\n"
            "defaults: {expected_duration: 1m, memory_mb: 512, run_on: lam}\nrules:\n  - {name: all, run_on: lam}\n"
        )
    )
    router = RoutingExecutor(policy=policy)  # as in the API server: built, never started
    ti = SimpleNamespace(task_id="t", external_executor_id="logs|req-7")
    assert router.get_task_log(ti, 2) == (["fake log for t id=req-7"], ["try 2"])
    assert ti.external_executor_id == "logs|req-7"
    assert router.get_task_log(SimpleNamespace(task_id="t", external_executor_id="lam"), 1) == ([], [])
    assert router.get_task_log(SimpleNamespace(task_id="t", external_executor_id="gone|x"), 1) == ([], [])
    assert router.get_task_log(SimpleNamespace(task_id="t", external_executor_id=None), 1) == ([], [])


# -- prefetch ---------------------------------------------------------------------------------------------------


def prefetching_router(make_router, prefetch: int = 2) -> RoutingExecutor:
    """local_a (limit 2) queues internally like LocalExecutor and may hold ``prefetch`` more tasks."""
    router = make_router(local_a=QueueingChild(parallelism=2, label="a"))
    router.children["local_a"].prefetch = prefetch
    return router


def test_a_prefetching_child_holds_its_limit_plus_prefetch_and_the_rest_waits_in_the_router(make_router):
    router = prefetching_router(make_router)
    # local_a itself accepts 2 (its parallelism) until its next heartbeat takes them into its queue.
    assert router.slots_available == (2 + 2 + 1) + (2 + 2 + 1)
    for i in range(5):
        router.queue_workload(make_workload(f"t{i}", priority_weight=10 - i), session=None)
    router.heartbeat()
    local_a = fake(router, "local_a")
    assert [w.ti.task_id for w in local_a.dispatched] == ["t0", "t1", "t2", "t3"]
    assert router.children["local_a"].in_flight == {w.ti.key for w in local_a.dispatched}
    assert [w.ti.task_id for w in router.queued_tasks.values()] == ["t4"]
    assert router.slots_available == (2 + 0 + 1) + (5 - 1)
    # One finishes: the child's own queue already holds the next task; the router refills its queue.
    local_a.finish(local_a.dispatched[0].ti.key)
    router.heartbeat()
    assert [w.ti.task_id for w in local_a.dispatched][-1] == "t4"
    assert not router.queued_tasks


def test_without_prefetch_a_queueing_child_gets_only_its_limit(make_router):
    router = prefetching_router(make_router, prefetch=0)
    for i in range(4):
        router.queue_workload(make_workload(f"t{i}"), session=None)
    router.heartbeat()
    assert len(fake(router, "local_a").dispatched) == 2
    assert len(router.queued_tasks) == 2


def test_a_free_overflow_slot_wins_over_waiting_in_the_first_choices_queue(make_router, audit_rows):
    # local_b (limit 1) prefetches one; its rule overflows to local_a (limit 2, no prefetch).
    router = make_router(local_b=QueueingChild(parallelism=1, label="b"))
    router.children["local_b"].prefetch = 1
    for i in range(5):
        router.queue_workload(make_workload(f"b{i}", queue="b", priority_weight=10 - i), session=None)
    router.heartbeat()
    assert [w.ti.task_id for w in fake(router, "local_b").dispatched] == ["b0", "b3"]
    assert [w.ti.task_id for w in fake(router, "local_a").dispatched] == ["b1", "b2"]
    assert len(router.queued_tasks) == 1  # b4: no room to start anywhere, local_b's queue is full
    how = {row.task_id: json.loads(row.extra)["how"] for row in audit_rows}
    assert how == {"b0": "policy", "b1": "overflow", "b2": "overflow", "b3": "policy"}


def test_no_prefetch_behind_a_task_expected_to_run_long(make_router):
    router = prefetching_router(make_router)
    long_task = make_workload("long", executor_config={"hybrid_router": {"expected_duration": "30m"}})
    router.queue_workload(long_task, session=None)
    for i in range(3):
        router.queue_workload(make_workload(f"t{i}", priority_weight=0), session=None)
    router.heartbeat()
    # A prefetched task would wait behind the long one, its token and queued clock running out.
    assert [w.ti.task_id for w in fake(router, "local_a").dispatched] == ["long", "t0"]
    assert router.slots_available == (2 + 0 + 1) + (5 - 2)
    fake(router, "local_a").finish(long_task.ti.key)
    router.heartbeat()
    # Behind short tasks only again: the queue opens.
    assert [w.ti.task_id for w in fake(router, "local_a").dispatched] == ["long", "t0", "t1", "t2"]


def test_prefetch_defaults_to_the_limit_for_local_and_lambda_executors_only(write_policy):
    from hybrid_router.router.children import build_children

    policy = load_policy(
        write_policy(
            "version: 1\n"
            "executors:\n"
            "  local: {class: LocalExecutor, max_concurrency: 3}\n"
            "  local_no_queue: {class: LocalExecutor, max_concurrency: 3, prefetch: 0}\n"
            "  local_more: {class: LocalExecutor, max_concurrency: 3, prefetch: 7}\n"
            "  other: {class: router_fakes.FakeChild, max_concurrency: 3}\n"
            "  lambda: {class: hybrid_router.lambda_exec.LambdaExecutor, max_concurrency: 4}\n"
            "defaults: {expected_duration: 1m, memory_mb: 512, run_on: local}\n"
            "rules:\n"
            "  - {name: all, run_on: local}\n"
        )
    )
    children = build_children(policy.executors)
    assert {name: child.prefetch for name, child in children.items()} == {
        "local": 3,
        "local_no_queue": 0,
        "local_more": 7,
        "other": 0,
        "lambda": 4,  # it invokes a task it holds the moment one of its runs ends
    }
    # It counts what it holds in its own ``running``: room for its prefetch, no more than its limit invoked.
    lambda_ = children["lambda"]
    assert (lambda_.limit, lambda_.executor.parallelism, lambda_.executor.max_in_flight) == (4, 8, 4)
    assert children["local"].executor.parallelism == 3  # LocalExecutor's queue is outside ``running``


# -- one run per try: external ids across tries ------------------------------------------------------------------


def adopting_lambda(router: RoutingExecutor) -> list:
    """Make the router's lambda child adopt whatever it is offered, like the Lambda executor; returns the offers."""
    offered: list = []
    fake(router, "lambda").try_adopt_task_instances = lambda tis: (
        offered.extend(
            SimpleNamespace(key=ti.key, external_executor_id=ti.external_executor_id) for ti in tis
        )
        or []
    )
    return offered


@pytest.fixture
def rebuilt(monkeypatch) -> dict:
    """Task instance id -> the workload adoption rebuilds from its row (no database: tests put them here)."""
    from hybrid_router.router import fallback

    workloads: dict = {}
    monkeypatch.setattr(fallback, "fresh_workload", lambda session, ti_id, generator: workloads.get(ti_id))
    monkeypatch.setattr("airflow.utils.session.create_session", lambda scoped=True: contextlib.nullcontext())
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)
    return workloads


def held_row(workload, external_executor_id, state=TaskInstanceState.QUEUED):
    return SimpleNamespace(
        id=workload.ti.id, key=workload.ti.key, state=state, external_executor_id=external_executor_id
    )


def test_tries_a_dead_router_held_wait_in_the_new_one_and_run_once_in_the_same_try(make_router, rebuilt):
    refusing = FakeChild(parallelism=2, label="a")
    refusing.try_adopt_task_instances = lambda tis: list(tis)  # like LocalExecutor: adopts nothing
    router = make_router(local_a=refusing)
    offered = adopting_lambda(router)
    own_id = make_workload("own_id", queue="lambda", try_number=2)
    no_id = make_workload("no_id", queue="b")
    earlier_try = make_workload("earlier_try", queue="lambda", try_number=3)
    on_local = make_workload("on_local")
    claimed = make_workload("claimed")  # RUNNING: some run holds it, whatever the id says
    for workload in (own_id, no_id, earlier_try):
        rebuilt[workload.ti.id] = workload
    rows = [
        held_row(own_id, "(router)@2"),
        held_row(no_id, None),
        held_row(earlier_try, "lambda@2|lambda:airflow-task:req:d2"),
        held_row(on_local, "local_a@1"),  # handed to a LocalExecutor: in its orphaned workers' hands
        held_row(claimed, "(router)@1", state=TaskInstanceState.RUNNING),
    ]

    not_adopted = router.try_adopt_task_instances(rows)

    assert {row.key.task_id for row in not_adopted} == {"on_local", "claimed"}
    assert offered == []
    assert all(row.queued_dttm is not None for row in rows[:3])  # the stuck-in-queued clock restarts
    assert events(router) == {
        own_id.ti.key: (TaskInstanceState.QUEUED, "(router)@2"),
        no_id.ti.key: (TaskInstanceState.QUEUED, "(router)@1"),
        earlier_try.ti.key: (TaskInstanceState.QUEUED, "(router)@3"),
    }
    router.heartbeat()
    assert [w.ti.key for w in fake(router, "lambda").dispatched] == [own_id.ti.key, earlier_try.ti.key]
    assert [w.ti.key for w in fake(router, "local_b").dispatched] == [no_id.ti.key]
    assert all(router.has_task(w.ti) for w in (own_id, no_id, earlier_try))


def test_a_held_try_whose_row_is_gone_is_left_to_the_scheduler(make_router, rebuilt):
    router = make_router()
    gone = make_workload("gone")
    row = held_row(gone, "(router)@1")
    assert router.try_adopt_task_instances([row]) == [row]
    assert not router.has_task(row) and router.queued_tasks == {}


def test_each_hand_over_is_recorded_before_the_child_gets_the_task(make_router, monkeypatch):
    router = make_router()
    router.job_id = 7  # run by a scheduler, whose task instances another one may adopt
    child = fake(router, "local_a")
    recorded: list = []
    # A heartbeat hands tasks out twice (before and after its children's): the database is away for both.
    database_up = [False, False, True]
    workloads = [make_workload("first"), make_workload("second")]

    class Database:
        def execute(self, statement, rows):
            if not database_up.pop(0):
                raise RuntimeError("the database is away")
            recorded.append(
                (sorted((row["ti_id"], row["external_id"]) for row in rows), len(child.dispatched))
            )

        def scalars(self, statement):  # the task instances this scheduler job still owns
            return [w.ti.id for w in workloads]

    monkeypatch.setattr(
        "airflow.utils.session.create_session", lambda scoped=True: contextlib.nullcontext(Database())
    )
    for workload in workloads:
        router.queue_workload(workload, session=None)

    router.heartbeat()  # nothing recorded: nobody has them, they wait
    assert child.dispatched == [] and set(router.queued_tasks) == {w.ti.key for w in workloads}
    router.heartbeat()
    assert [w.ti.key for w in child.dispatched] == [w.ti.key for w in workloads]
    assert recorded == [(sorted((w.ti.id, "local_a@1") for w in workloads), 0)]


def test_a_try_another_scheduler_adopted_while_this_one_counted_as_dead_is_left_to_it(
    make_router, monkeypatch
):
    # This scheduler stalled past the health threshold: another one adopted a try it held, and runs it.
    router = make_router()
    router.job_id = 7
    mine, adopted = make_workload("mine"), make_workload("adopted_elsewhere")

    class Database:
        def execute(self, statement, rows):
            pass

        def scalars(self, statement):
            return [mine.ti.id]

    monkeypatch.setattr(
        "airflow.utils.session.create_session", lambda scoped=True: contextlib.nullcontext(Database())
    )
    for workload in (mine, adopted):
        router.queue_workload(workload, session=None)
    router.heartbeat()

    assert [w.ti.key for w in fake(router, "local_a").dispatched] == [mine.ti.key]
    assert not router.has_task(adopted.ti) and adopted.ti.key not in router.queued_tasks


def test_a_later_try_is_never_adopted_through_the_previous_runs_external_id(make_router, rebuilt):
    router = make_router()
    first = make_workload("retried", queue="lambda", try_number=1)
    router.queue_workload(first, session=None)
    router.heartbeat()
    _, stored = events(router)[first.ti.key]  # what the scheduler stores for try 1's run on lambda
    fake(router, "lambda").finish(first.ti.key, TaskInstanceState.FAILED)
    router.heartbeat()
    events(router)
    # Try 2 is QUEUED, and its row still carries try 1's id (Airflow keeps it across tries): the scheduler died
    # before it stored the router's own id for try 2. The next scheduler's router is offered that row.
    restarted = make_router()
    offered = adopting_lambda(restarted)
    second = make_workload("retried", queue="lambda", try_number=2)
    rebuilt[second.ti.id] = second
    row = SimpleNamespace(
        id=second.ti.id, key=second.ti.key, state=TaskInstanceState.QUEUED, external_executor_id=stored
    )

    # No child watches try 1's run for it: try 2 was never handed to a child (that would have stored
    # "lambda@2"), so it waits in the new router.
    assert restarted.try_adopt_task_instances([row]) == []

    assert offered == [] and restarted.has_task(row) and second.ti.key in restarted.queued_tasks
    assert row.external_executor_id == stored
    # The try the id was written for is still adopted, and its child sees only its own id.
    same_try = SimpleNamespace(
        id=first.ti.id, key=first.ti.key, state=TaskInstanceState.RUNNING, external_executor_id=stored
    )
    assert restarted.try_adopt_task_instances([same_try]) == []
    assert [(o.key, o.external_executor_id) for o in offered] == [(first.ti.key, "lambda-run-retried")]


def test_an_id_written_before_tries_were_recorded_is_trusted_only_for_a_running_task(make_router):
    # The previous version wrote "<child>|<child's id>": any try's. A QUEUED try 2 may carry try 1's.
    router = make_router()
    offered = adopting_lambda(router)
    second_try = make_workload("retried", queue="lambda", try_number=2)
    queued = SimpleNamespace(
        id=second_try.ti.id,
        key=second_try.ti.key,
        state=TaskInstanceState.QUEUED,
        external_executor_id="lambda|lambda:airflow-task:req-try1:dispatch-of-try-1",
    )
    running = SimpleNamespace(
        id="r",
        key=make_workload("running").ti.key,
        state=TaskInstanceState.RUNNING,
        external_executor_id="lambda|d2",
    )

    assert router.try_adopt_task_instances([queued, running]) == [queued]

    assert [(o.key, o.external_executor_id) for o in offered] == [(running.key, "d2")]
    assert not router.has_task(queued) and router.has_task(running)


def test_the_router_writes_its_own_id_when_it_takes_a_try_and_adoption_never_hands_that_to_a_child(
    make_router, rebuilt
):
    router = make_router()
    running = [make_workload(f"t{i}") for i in range(2)]  # local_a's two slots
    waiting = make_workload("waits", try_number=2)  # its rule has no overflow
    for workload in (*running, waiting):
        router.queue_workload(workload, session=None)
    router.heartbeat()
    assert events(router)[waiting.ti.key] == (TaskInstanceState.QUEUED, "(router)@2")

    restarted = make_router()
    offered = adopting_lambda(restarted)
    rebuilt[waiting.ti.id] = waiting.model_copy(update={"token": "fresh"})
    row = SimpleNamespace(
        id=waiting.ti.id,
        key=waiting.ti.key,
        state=TaskInstanceState.QUEUED,
        external_executor_id="(router)@2",
    )
    assert restarted.try_adopt_task_instances([row]) == []
    assert offered == []
    restarted.heartbeat()
    # It ran from the new router, in the same try, with a workload (and token) made for it now.
    assert [(w.ti.key, w.token) for w in fake(restarted, "local_a").dispatched] == [(waiting.ti.key, "fresh")]


def test_a_try_waiting_for_its_fallback_no_longer_names_its_dead_run(make_router, monkeypatch):
    router = make_router()
    workload = make_workload("short", queue="lambda")
    monkeypatch.setattr(executor_module, "redispatch_same_try", lambda *a: workload)
    monkeypatch.setattr(RoutingExecutor, "jwt_generator", None)
    router.queue_workload(workload, session=None)
    for i in range(3):  # fill both fallback executors, local_b (1) and local_a (2)
        router.queue_workload(make_workload(f"fill{i}", queue="b"), session=None)
    router.heartbeat()
    assert events(router)[workload.ti.key][0] == TaskInstanceState.RUNNING  # on lambda

    fake(router, "lambda").die(workload.ti.key)
    router.heartbeat()

    # The same try waits in the router; the scheduler stores the router's id over the dead run's (which the
    # conditional reset also cleared in the database, see test_fallback.py).
    assert events(router) == {workload.ti.key: (TaskInstanceState.QUEUED, "(router)@1")}
    assert router.has_task(workload.ti)


def test_the_task_log_of_a_try_never_comes_from_another_tries_run(write_policy):
    policy = load_policy(
        write_policy(
            f"version: 1\nexecutors:\n  logs: {{class: {__name__}.LogChild}}\n"
            "defaults: {expected_duration: 1m, memory_mb: 512, run_on: logs}\nrules:\n  - {name: all, run_on: logs}\n"
        )
    )
    router = RoutingExecutor(policy=policy)
    ti = SimpleNamespace(task_id="t", external_executor_id="logs@1|req-7")
    assert router.get_task_log(ti, 1) == (["fake log for t id=req-7"], ["try 1"])
    assert router.get_task_log(ti, 2) == ([], [])  # try 2 has not run yet: try 1's run is not its log
    assert router.get_task_log(SimpleNamespace(task_id="t", external_executor_id="(router)@2"), 2) == ([], [])


# -- a child that cannot start -----------------------------------------------------------------------------------


def test_a_child_that_cannot_start_takes_no_tasks_and_is_retried_with_back_off(
    make_router, clock, counters, caplog
):
    from router_fakes import UnstartableChild

    unstartable = UnstartableChild(parallelism=2, label="lambda", failures=3)
    router = make_router(**{"lambda": unstartable})  # start() returns: the scheduler keeps running
    from hybrid_router.router.children import START_RETRY_FIRST_S, START_RETRY_MAX_S

    assert fake(router, "local_a").started and fake(router, "local_b").started
    assert not router.children["lambda"].available and router.children["lambda"].free_slots() == 0
    first = make_workload("short", queue="lambda")
    router.queue_workload(first, session=None)
    router.heartbeat()
    assert [w.ti.key for w in fake(router, "local_a").dispatched] == [first.ti.key]  # its rule's overflow
    assert unstartable.heartbeats == 0  # an executor that never started is not driven

    clock.now += START_RETRY_FIRST_S * 0.7  # within the first back-off, whatever the jitter: no attempt
    router.heartbeat()
    assert unstartable.start_calls == 1
    clock.now += START_RETRY_FIRST_S * 0.3
    router.heartbeat()
    assert unstartable.start_calls == 2 and not router.children["lambda"].available
    clock.now += START_RETRY_MAX_S
    router.heartbeat()
    assert unstartable.start_calls == 3
    clock.now += START_RETRY_MAX_S
    router.heartbeat()
    assert unstartable.start_calls == 4 and unstartable.started and router.children["lambda"].available

    later = make_workload("later", queue="lambda")
    router.queue_workload(later, session=None)
    router.heartbeat()
    assert [w.ti.key for w in unstartable.dispatched] == [later.ti.key]
    assert counters.count("hybrid_router.child_start_failed.lambda") == 3
    # Logged once when it became unavailable and once when it came back (masking: test_children.py).
    about_lambda = [r for r in caplog.records if r.getMessage().startswith("Child executor lambda")]
    assert [r.levelname for r in about_lambda] == ["ERROR", "WARNING"]
    error = about_lambda[0]
    assert "ClientError" in error.getMessage() and "ExpiredTokenException" in error.getMessage()
    assert error.exc_info is None  # no traceback: it would carry the unmasked message


def test_a_task_whose_only_executor_cannot_start_waits_in_the_router_until_it_starts(make_router, clock):
    from router_fakes import UnstartableChild

    router = make_router(local_a=UnstartableChild(parallelism=2, label="a", failures=1))
    from hybrid_router.router.children import START_RETRY_FIRST_S

    workload = make_workload("plain")  # its rule has no overflow
    router.queue_workload(workload, session=None)
    router.heartbeat()
    router.heartbeat()
    assert events(router) == {workload.ti.key: (TaskInstanceState.QUEUED, "(router)@1")}  # never failed
    assert router.has_task(workload.ti) and fake(router, "local_a").dispatched == []

    clock.now += START_RETRY_FIRST_S
    router.heartbeat()
    assert [w.ti.key for w in fake(router, "local_a").dispatched] == [workload.ti.key]
    assert events(router) == {workload.ti.key: (TaskInstanceState.QUEUED, "local_a@1")}

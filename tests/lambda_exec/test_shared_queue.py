"""Executors sharing one results queue: owner routing in a process, prompt release between processes.

Two ``SharedQueues`` registries model two schedulers (each process has one); executors given the same registry
are the children of one router. Assertions count releases, deletes and receives, never seconds.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.utils.state import TaskInstanceState

from devtools.workloads import make_workload
from hybrid_router.lambda_exec.config import LambdaConfigError
from hybrid_router.lambda_exec.external_id import lambda_external_id
from hybrid_router.lambda_exec.protocol import Outcome, Phase, TaskRef
from hybrid_router.lambda_exec.results import FREE_RELEASES, Disposition, QueueReader, release_delay_s
from hybrid_router.lambda_exec.shared_readers import SharedQueues

from .fakes import FakeSqs
from .test_executor_unit import RESULTS, make_executor, result, sent_event

FINAL = (TaskInstanceState.SUCCESS, TaskInstanceState.FAILED)


class CountingSqs(FakeSqs):
    """Records each message's receive count when received, and with each release."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.counts: dict[str, int] = {}
        self.releases: list[tuple[int, int]] = []  # (receive count, VisibilityTimeout)

    def receive_message(self, **kwargs: Any) -> dict[str, Any]:
        answer = super().receive_message(**kwargs)
        for message in answer.get("Messages", []):
            self.counts[message["ReceiptHandle"]] = int(message["Attributes"]["ApproximateReceiveCount"])
        return answer

    def change_message_visibility_batch(self, **kwargs: Any) -> dict[str, Any]:
        for entry in kwargs["Entries"]:
            self.releases.append((self.counts[entry["ReceiptHandle"]], entry["VisibilityTimeout"]))
        return super().change_message_visibility_batch(**kwargs)


@pytest.fixture
def executors():
    created = []

    def factory(**kwargs):
        # A 1 s long poll: FakeSqs then pauses an empty receive (a 0 s one would spin and starve other readers).
        executor, lambda_, _ = make_executor(**{"poll_wait_seconds": 1, **kwargs})
        executor.start()
        created.append(executor)
        return executor, lambda_

    yield factory
    for executor in created:
        executor.terminate()


def finals(executors_, expected: int, timeout: float = 10.0) -> dict:
    """Heartbeat every executor until ``expected`` tasks have a final state; the final states by executor."""
    seen: dict[int, dict] = {i: {} for i in range(len(executors_))}
    deadline = time.monotonic() + timeout
    while sum(len(s) for s in seen.values()) < expected:
        assert time.monotonic() < deadline, f"only {seen} of {expected} final states"
        for i, executor in enumerate(executors_):
            executor.heartbeat()
            seen[i].update((k, v[0]) for k, v in executor.get_event_buffer().items() if v[0] in FINAL)
        time.sleep(0.02)
    return seen


def queue_and_invoke(executor, lambda_, names: list[str]) -> list:
    loads = [make_workload(name) for name in names]
    for workload in loads:
        executor.queue_workload(workload, session=None)
    deadline = time.monotonic() + 10
    while len(lambda_.invokes) < len(names):
        assert time.monotonic() < deadline
        executor.heartbeat()
        time.sleep(0.01)
    executor.heartbeat()
    return [sent_event(lambda_, i) for i in range(len(names))]


def test_executors_of_one_process_share_one_reader_and_never_bounce_a_message(executors):
    # The README's router: `lambda` and `lambda_10g` read the same queue. One reader hands each message to the
    # executor that holds its dispatch, in memory: no release, each message received once.
    sqs = CountingSqs(redeliver_released=True)
    queues = SharedQueues()
    small, small_lambda = executors(sqs=sqs, queues=queues, function_name="airflow-task")
    big, big_lambda = executors(sqs=sqs, queues=queues, function_name="airflow-task-10g")
    assert len(queues) == 2  # one reader for the results queue, one for the DLQ, whoever reads them
    small_events = queue_and_invoke(small, small_lambda, [f"s{i}" for i in range(12)])
    big_events = queue_and_invoke(big, big_lambda, [f"b{i}" for i in range(12)])
    for a, b in zip(small_events, big_events, strict=True):
        sqs.send(RESULTS, result(b, Phase.FINISHED, Outcome.FAILED))
        sqs.send(RESULTS, result(a, Phase.FINISHED, Outcome.FAILED))
    seen = finals([small, big], 24)
    assert {k.task_id for k in seen[0]} == {f"s{i}" for i in range(12)}
    assert {k.task_id for k in seen[1]} == {f"b{i}" for i in range(12)}
    assert sqs.released == []
    assert set(sqs.counts.values()) == {1}


def test_two_schedulers_on_one_queue_hand_each_other_results_at_once(executors):
    # Two schedulers (a registry each): a reader that gets the other's result makes it visible again at once
    # (visibility 0), never for a visibility timeout, unless the message was bounced more than FREE_RELEASES
    # times (its owner gone: then a short growing delay).
    sqs = CountingSqs(redeliver_released=True)
    first, first_lambda = executors(sqs=sqs, queues=SharedQueues())
    second, second_lambda = executors(sqs=sqs, queues=SharedQueues())
    first_events = queue_and_invoke(first, first_lambda, [f"a{i}" for i in range(12)])
    second_events = queue_and_invoke(second, second_lambda, [f"b{i}" for i in range(12)])
    for a, b in zip(first_events, second_events, strict=True):
        sqs.send(RESULTS, result(a, Phase.FINISHED, Outcome.FAILED))
        sqs.send(RESULTS, result(b, Phase.FINISHED, Outcome.FAILED))
    seen = finals([first, second], 24)
    assert {k.task_id for k in seen[0]} == {f"a{i}" for i in range(12)}
    assert {k.task_id for k in seen[1]} == {f"b{i}" for i in range(12)}
    assert sqs.releases, "each reader saw some of the other's results"
    assert all(timeout == release_delay_s(count) for count, timeout in sqs.releases), sqs.releases
    assert all(count <= FREE_RELEASES for count, _ in sqs.releases), sqs.releases


def test_nobody_deletes_a_young_message_of_another_scheduler_however_often_it_was_seen(executors):
    # Scheduler 2 reads the queue while scheduler 1, whose run's result many readers have bounced (receive count
    # 12), is between two receives (here: not started yet). Scheduler 2 must leave the message, not delete it.
    sqs = FakeSqs(redeliver_released=True, visibility_scale=0.001)
    other, other_lambda = executors(sqs=sqs, queues=SharedQueues())
    queue_and_invoke(other, other_lambda, ["keeps-the-other-reading"])
    workload = make_workload("mine")
    event = SimpleNamespace(dispatch_id="d-1", task=TaskRef(*workload.ti.key))
    handle = "rh-" + sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.FAILED), receive_count=12)
    deadline = time.monotonic() + 10
    while handle not in sqs.released:
        assert time.monotonic() < deadline and handle not in sqs.deleted
        other.heartbeat()
        time.sleep(0.01)
    owner, _ = executors(sqs=sqs, queues=SharedQueues())
    ti = SimpleNamespace(
        key=workload.ti.key,
        state=TaskInstanceState.RUNNING,
        external_executor_id=lambda_external_id("airflow-task", "req-1", "d-1"),
    )
    assert owner.try_adopt_task_instances([ti]) == []
    seen = finals([owner, other], 1)
    assert seen[0] == {workload.ti.key: TaskInstanceState.FAILED}
    while handle not in sqs.deleted:  # by its owner, once the scheduler took the event
        assert time.monotonic() < deadline
        owner.heartbeat()
        time.sleep(0.01)
    assert sqs.deleted.count(handle) == 1


def test_an_unowned_message_older_than_the_bound_is_deleted_and_a_younger_one_kept(executors):
    sqs = FakeSqs()
    executor, lambda_ = executors(sqs=sqs, queues=SharedQueues(), unowned_message_max_age=3600)
    queue_and_invoke(executor, lambda_, ["keeps-reading"])
    ghost = SimpleNamespace(dispatch_id="a-dead-schedulers", task=sent_event(lambda_).task)
    old = sqs.send(RESULTS, result(ghost, Phase.STARTED), sent_at=time.time() - 3601)
    young = sqs.send(RESULTS, result(ghost, Phase.STARTED), sent_at=time.time() - 3500, receive_count=30)
    deadline = time.monotonic() + 10
    while f"rh-{young}" not in sqs.released:
        assert time.monotonic() < deadline
        executor.heartbeat()
        time.sleep(0.01)
    assert sqs.deleted == [f"rh-{old}"]
    assert sqs.release_timeouts == [(f"rh-{young}", 20)]


def test_an_adopted_dispatchs_hidden_result_is_shown_at_once(executors):
    # The survivor's reader kept releasing a dead scheduler's result, hidden longer each time; once it adopts the
    # task, the result is made visible at once rather than after its delay (scaled here to "never").
    sqs = FakeSqs(redeliver_released=True, visibility_scale=1000)
    survivor, survivor_lambda = executors(sqs=sqs, queues=SharedQueues())
    queue_and_invoke(survivor, survivor_lambda, ["own-work"])
    workload = make_workload("orphan")
    event = SimpleNamespace(dispatch_id="d-dead", task=TaskRef(*workload.ti.key))
    count = FREE_RELEASES + 3
    handle = "rh-" + sqs.send(RESULTS, result(event, Phase.FINISHED, Outcome.FAILED), receive_count=count)
    deadline = time.monotonic() + 10
    while handle not in sqs.released:
        assert time.monotonic() < deadline
        survivor.heartbeat()
        time.sleep(0.01)
    assert sqs.release_timeouts == [(handle, release_delay_s(count))] and release_delay_s(count) > 0
    ti = SimpleNamespace(
        key=workload.ti.key,
        state=TaskInstanceState.RUNNING,
        external_executor_id=lambda_external_id("airflow-task", "req-dead", "d-dead"),
    )
    assert survivor.try_adopt_task_instances([ti]) == []
    seen = finals([survivor], 1)
    assert seen[0] == {workload.ti.key: TaskInstanceState.FAILED}
    assert sqs.release_timeouts[1] == (handle, 0)


def test_executors_sharing_a_queue_must_share_the_secret(executors):
    sqs = FakeSqs()
    queues = SharedQueues()
    executors(sqs=sqs, queues=queues)
    with pytest.raises(LambdaConfigError, match=r"results_queue_url .* another signing_secret"):
        executors(sqs=sqs, queues=queues, function_name="airflow-task-10g", signing_secret="another")
    assert len(queues) == 2  # the refused executor left nothing behind


def test_a_released_message_is_hidden_longer_by_its_own_receive_count():
    free = [0] * FREE_RELEASES
    assert [release_delay_s(n) for n in range(1, FREE_RELEASES + 8)] == [*free, 1, 2, 4, 8, 16, 20, 20]
    sqs = FakeSqs(redeliver_released=True, visibility_scale=0.001)
    reader = QueueReader(
        name="test-reader",
        sqs=sqs,
        queue_url=RESULTS,
        classify=lambda message: Disposition.RELEASE,
        is_active=lambda: True,
        wait_seconds=0,
        max_sightings=10,
        gather_s=0,
    )
    handle = "rh-" + sqs.send(RESULTS, "an orphan's result")
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while len(sqs.release_timeouts) < FREE_RELEASES + 6:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        reader.stop(timeout=5)
    expected = [*[0] * FREE_RELEASES, 1, 2, 4, 8, 16, 20]
    assert sqs.release_timeouts[: FREE_RELEASES + 6] == [(handle, t) for t in expected]

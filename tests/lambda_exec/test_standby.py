"""Tasks waiting for a slot of the function go the moment a run reports its end (``standby``), not at the next
heartbeat: the waiting events, what launches them, and the executor that fills and takes them."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from airflow.utils.state import TaskInstanceState

from hybrid_router.lambda_exec.protocol import Outcome, Phase
from hybrid_router.lambda_exec.standby import Standby

from .executor_support import drive
from .fakes import FakeClock
from .test_executor_unit import RESULTS, accepted, result, sent_event, started, two_tasks_one_slot  # noqa: F401


class Launcher:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, event: str) -> Future:
        self.sent.append(event)
        return Future()


def standby(now: list[float] | None = None) -> tuple[Standby, Launcher]:
    clock = now if now is not None else [100.0]
    launcher = Launcher()
    return Standby(launcher, clock=lambda: clock[0], max_age_s=30), launcher


def test_a_run_end_launches_the_oldest_waiting_event_once() -> None:
    waiting, launcher = standby()
    with waiting.held():
        waiting.refill([("d1", "event-1", 100.0), ("d2", "event-2", 100.0)])
    assert waiting.slot_freed("run-a") == "d1"
    # The same run's end delivered again frees no second slot.
    assert waiting.slot_freed("run-a") is None
    assert waiting.slot_freed("run-b") == "d2"
    assert waiting.slot_freed("run-c") is None  # nothing waits: the slot is the scheduler's to fill
    assert launcher.sent == ["event-1", "event-2"] and waiting.launches == 2
    with waiting.held():
        assert set(waiting.take_launched()) == {"d1", "d2"}
        assert waiting.take_launched() == {}


def test_a_withdrawn_dispatch_is_not_launched_and_its_launched_invoke_is_cancelled() -> None:
    waiting, launcher = standby()
    with waiting.held():
        waiting.refill([("d1", "event-1", 100.0), ("d2", "event-2", 100.0)])
    waiting.withdraw("d1")
    assert waiting.slot_freed("run-a") == "d2"
    waiting.withdraw("d2")
    with waiting.held():
        assert waiting.take_launched() == {}
    assert launcher.sent == ["event-2"]


def test_an_event_sealed_too_long_ago_is_left_to_the_scheduler_thread() -> None:
    now = [100.0]
    waiting, launcher = standby(now)
    with waiting.held():
        waiting.refill([("old", "event-old", 60.0), ("fresh", "event-fresh", 95.0)])
    assert waiting.slot_freed("run-a") == "fresh"
    assert launcher.sent == ["event-fresh"] and len(waiting) == 0


def test_no_launch_while_the_scheduler_thread_holds_it() -> None:
    waiting, launcher = standby()
    launched: list[str | None] = []
    with waiting.held():
        waiting.refill([("d1", "event-1", 100.0)])
        reader = threading.Thread(target=lambda: launched.append(waiting.slot_freed("run-a")))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive() and launcher.sent == []  # the reader waits for the count to be done
        waiting.refill([])
    reader.join(5)
    assert launched == [None] and launcher.sent == []


# -- through the executor ------------------------------------------------------------------------------------------


def test_a_run_end_invokes_the_task_waiting_for_its_slot_before_any_heartbeat(started) -> None:  # noqa: F811
    executor, lambda_, sqs, first, second = two_tasks_one_slot(started)
    time.sleep(0.2)
    assert len(lambda_.invokes) == 1  # the function's one slot is taken

    sqs.send(RESULTS, result(sent_event(lambda_, 0), Phase.FINISHED, Outcome.SUCCESS, run_id="run-1"))
    deadline = time.monotonic() + 5
    while len(lambda_.invokes) < 2:  # no heartbeat: the reader that delivered the end invoked it
        assert time.monotonic() < deadline, "the waiting task was not invoked on the run's end"
        time.sleep(0.01)
    assert sent_event(lambda_, 1).task.task_id == "second"

    # The next heartbeat takes the invoke as the second task's: accepted, never invoked twice.
    drive(
        executor,
        lambda ev: (
            accepted(ev, second.ti.key) and ev.get(first.ti.key, (None,))[0] == TaskInstanceState.SUCCESS
        ),
    )
    assert executor._dispatches[second.ti.key].attempts == 1
    for _ in range(3):
        executor.heartbeat()
    assert len(lambda_.invokes) == 2


def test_a_run_that_never_held_the_task_frees_no_slot(started) -> None:  # noqa: F811
    clock = FakeClock()
    executor, lambda_, sqs, _, _ = two_tasks_one_slot(started, clock=clock)
    # A duplicate delivery of the first event found the task claimed: its end frees no slot this executor counted.
    duplicate = result(
        sent_event(lambda_, 0), Phase.FINISHED, Outcome.NOT_CLAIMED, run_id="copy", now=clock.now
    )
    sqs.send(RESULTS, duplicate)
    deadline = time.monotonic() + 2
    while len(executor._inbox) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(lambda_.invokes) == 1


def test_a_router_child_invokes_no_more_than_its_limit_and_holds_the_rest(started) -> None:  # noqa: F811
    """A router's Lambda child holds its prefetch past ``max_in_flight`` (its limit), on a function without a
    known concurrency: the limit, not its larger parallelism, bounds what it invokes."""
    from .test_executor_unit import make_workload, wait_invokes

    executor, lambda_, _ = started()
    executor.max_in_flight = 2
    for index in range(4):
        executor.queue_workload(make_workload(f"t{index}"), session=None)
    executor.heartbeat()
    wait_invokes(executor, lambda_, 2)
    for _ in range(3):
        executor.heartbeat()
    assert len(lambda_.invokes) == 2 and len(executor._standby) == 2
    assert executor.free_capacity() == 0

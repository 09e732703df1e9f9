"""Demo DAGs for airflow-hybrid-router: each task shows one routing behaviour.

Nothing here knows about the router: the DAGs are ordinary Airflow DAGs, and where each task runs is decided by the
policy (``examples/policy.yaml``). The demo (``make demo``) runs them and checks each task's route and outcome.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

START = pendulum.datetime(2024, 1, 1, tz="UTC")
# How many tasks the burst runs at once: more than the demo Lambda function's reserved concurrency (3).
BURST_SIZE = 8
# Longer than the demo function's timeout (15 s, set by `make demo`), so that Lambda stops the task.
TOO_SLOW_S = 20
# More than the small demo function's 512 MB, well within the bigger one's 3008 MB.
HOG_MB = 1200


@dag(schedule=None, start_date=START, catchup=False, tags=["hybrid-router-demo"])
def hybrid_router_demo():
    @task
    def short_task() -> str:
        """No hint at all: the policy's default expected duration (short) sends it to Lambda."""
        return "done quickly"

    @task(execution_timeout=timedelta(minutes=40))
    def long_task() -> str:
        """Expected to run 40 minutes, over Lambda's 15-minute cap: it runs on the Local executor."""
        time.sleep(1)
        return "done slowly"

    @task(queue="lambda")
    def pinned_task() -> str:
        """queue="lambda" pins it to Lambda."""
        return "ran where it was pinned"

    @task
    def burst(i: int) -> int:
        """Eight at once against a function that runs three: the rest overflow to Local."""
        time.sleep(4)
        return i

    @task(executor_config={"hybrid_router": {"expected_duration": "1m"}})
    def too_slow() -> str:
        """Claims one minute, outlives the demo function's timeout: Lambda stops it, Local finishes it."""
        time.sleep(TOO_SLOW_S)
        return "finished on the fallback"

    # The order keeps the demo's outcome independent of timing. Airflow marks a task done a few seconds before its
    # Lambda run ends (the task runner winds down), and only then is the function's slot free again. The function
    # has 3 slots: too_slow, short_task and pinned_task take them at the start; the burst waits until too_slow is
    # done, long after every other Lambda run, so it finds the slots free and the rest of it overflows.
    # (`make demo` runs the other two DAGs while too_slow runs on Local, when the small function is idle.)
    slow = too_slow()
    short = short_task()
    pinned = pinned_task()
    [slow, short, pinned] >> burst.expand(i=list(range(BURST_SIZE)))
    long_task()


@dag(schedule=None, start_date=START, catchup=False, tags=["hybrid-router-demo"])
def hybrid_router_demo_memory():
    @task
    def memory_hog() -> int:
        """No memory hint: the policy's default (512 MB) sends it to the small function, where it runs out of
        memory; the same try finishes on the bigger one, and the router sends its next runs there directly."""
        block = bytearray(HOG_MB * 1024 * 1024)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        time.sleep(1)  # held a moment: the local Lambda service samples a run's memory every 0.1 s
        return len(block)

    memory_hog()


@dag(schedule=None, start_date=START, catchup=False, tags=["hybrid-router-demo"])
def hybrid_router_demo_own_failure():
    @task
    def fails_by_its_own_code() -> None:
        """A bug in the task is not an infrastructure failure: it fails, with no fallback."""
        raise ValueError("a bug in the task itself")

    fails_by_its_own_code()


hybrid_router_demo()
hybrid_router_demo_own_failure()
hybrid_router_demo_memory()

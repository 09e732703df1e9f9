"""A child executor for the end-to-end tests whose runs of ``*_dies`` tasks die for infrastructure reasons.

It runs each workload like LocalExecutor does (``BaseExecutor.run_workload`` in a process of its own), but kills
the whole process tree of a ``*_dies`` task after ``DIE_AFTER_S`` seconds and reports that as an infrastructure
failure, as the Lambda executor does after a timeout: the run is dead (fenced) before the router hears of it.
The scheduler imports this module by name, so the tests put its folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import psutil
from airflow.executors.base_executor import BaseExecutor, get_execution_api_server_url

from hybrid_router.child_protocol import InfrastructureFailure

DIE_AFTER_S = float(os.environ.get("ROUTER_TEST_DIE_AFTER_S", "2"))
DYING_SUFFIX = "_dies"


def _run(workload: Any) -> None:
    BaseExecutor.run_workload(workload, server=get_execution_api_server_url(), subprocess_logs_to_stdout=True)


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


class DyingLocalExecutor(BaseExecutor):
    is_local = True
    serve_logs = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._procs: dict[Any, tuple[multiprocessing.Process, float]] = {}
        self._failures: dict[Any, InfrastructureFailure] = {}

    def start(self) -> None:
        self._ctx = multiprocessing.get_context("fork")

    def _process_workloads(self, workload_items: Any) -> None:
        for workload in workload_items:
            self.queued_tasks.pop(workload.key, None)
            proc = self._ctx.Process(target=_run, args=(workload,), daemon=False)
            proc.start()
            self._procs[workload.key] = (proc, time.monotonic())
            self.running.add(workload.key)
            self.running_state(workload.key, f"pid-{proc.pid}")

    def sync(self) -> None:
        now = time.monotonic()
        for key, (proc, started) in list(self._procs.items()):
            if key.task_id.endswith(DYING_SUFFIX) and proc.is_alive() and now - started >= DIE_AFTER_S:
                _kill_tree(proc.pid)
                proc.join(5)
                del self._procs[key]
                self._failures[key] = InfrastructureFailure(
                    reason="runtime_crash", detail=f"worker killed after {DIE_AFTER_S:.1f} s"
                )
                self.fail(key)
            elif not proc.is_alive():
                proc.join()
                del self._procs[key]
                self.success(key)

    def pop_infrastructure_failure(self, key: Any) -> InfrastructureFailure | None:
        return self._failures.pop(key, None)

    def end(self) -> None:
        for proc, _ in self._procs.values():
            proc.join()

    def terminate(self) -> None:
        for proc, _ in self._procs.values():
            _kill_tree(proc.pid)

"""An executor for end-to-end tests that takes each task and runs nothing: it writes the workload (with its
execution-API token) to ``HOLDING_EXECUTOR_DIR`` and leaves the task QUEUED, so that a test can start the very
workload the scheduler made, as often and in whatever sandboxes it likes.

The scheduler imports this module by name, so the tests put its folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from airflow.executors.base_executor import BaseExecutor

DIR_ENV = "HOLDING_EXECUTOR_DIR"


class HoldingExecutor(BaseExecutor):
    def _process_workloads(self, workload_list: Any) -> None:
        folder = Path(os.environ[DIR_ENV])
        for workload in workload_list:
            self.queued_tasks.pop(workload.key, None)
            partial = folder / f".{workload.ti.id}.json"
            partial.write_text(workload.model_dump_json())
            partial.rename(folder / f"{workload.ti.id}.json")  # the test never reads half a workload

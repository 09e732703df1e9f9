"""Airflow's LocalExecutor with a worker count of its own, for ``scheduler_dispatch.py`` and ``scale.py``.

A bare LocalExecutor takes ``[core] parallelism`` as its worker count. The benchmarks hold ``[core] parallelism``
at 32 for every executor and give LocalExecutor as many workers as the router's local child and the Lambda
function's concurrency (16 in ``scheduler_dispatch.py``, 8 in ``scale.py``): this class changes nothing else.
The scheduler imports it from this folder (on its ``PYTHONPATH``) as
``dispatch_local_executor.SizedLocalExecutor``.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.executors.local_executor import LocalExecutor

WORKERS_ENV = "DISPATCH_LOCAL_WORKERS"


class SizedLocalExecutor(LocalExecutor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["parallelism"] = int(os.environ.get(WORKERS_ENV, "16"))
        super().__init__(*args, **kwargs)

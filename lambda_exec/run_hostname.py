"""The hostname a Lambda run gives Airflow: the sandbox's own, followed by the run's id.

Airflow's execution API tells one worker process from another by hostname, unixname and pid alone: its
``/run`` lets a task instance that is already RUNNING be started again by a request carrying the three it
recorded (the same process asking again after a lost answer), and its heartbeat checks hostname and pid.
Sandboxes of one Lambda function run the same process tree as the same user, and their hostnames are not
unique, so two copies of one event (AWS delivers async events at least once) can present the same identity,
and the second would be let in to run the try again. So the handler points Airflow's ``[core]
hostname_callable`` at ``hostname`` in each run's processes: every run presents a hostname of its own, and one
run's retries and heartbeats the same one.

The sandbox's part is what the function's own ``hostname_callable`` gives (Airflow's default unless the
function sets ``AIRFLOW__CORE__HOSTNAME_CALLABLE``), so the UI still shows where the run was. Only the task
instance's record carries the name: a Lambda sandbox serves no logs, so nothing has to reach it by that name.

Standard library only at import: the handler imports this module on every cold start.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Mapping

HOSTNAME_CALLABLE_ENV = "AIRFLOW__CORE__HOSTNAME_CALLABLE"
# The function's own hostname callable, for the sandbox's part of the name; set by the handler for each run.
BASE_CALLABLE_ENV = "HYBRID_ROUTER_BASE_HOSTNAME_CALLABLE"
# The run's id (``ResultMessage.run_id``), in the environment of the workload's processes (the task's too).
RUN_ID_ENV = "HYBRID_ROUTER_RUN_ID"
CALLABLE = f"{__name__}.hostname"
AIRFLOW_DEFAULT_CALLABLE = "airflow.utils.net.getfqdn"
RUN_MARK = "-run-"
# The length of Airflow's ``task_instance.hostname`` column.
MAX_LENGTH = 1000


def run_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What a run's processes need in their environment (beside ``RUN_ID_ENV``) to present the run's hostname,
    given the sandbox's ``environ``."""
    env = {HOSTNAME_CALLABLE_ENV: CALLABLE}
    base = environ.get(HOSTNAME_CALLABLE_ENV, "").strip()
    if base and base != CALLABLE:
        env[BASE_CALLABLE_ENV] = base
    return env


def run_hostname(base: str, run_id: str) -> str:
    """``<sandbox's hostname>-run-<run id>``, the sandbox's part cut so that the whole fits in Airflow's
    column."""
    if not run_id:
        return base
    suffix = f"{RUN_MARK}{run_id}"
    return f"{base[: MAX_LENGTH - len(suffix)]}{suffix}"


def hostname() -> str:
    """Airflow's ``[core] hostname_callable`` in a run's processes."""
    return run_hostname(
        _sandbox_hostname(os.environ.get(BASE_CALLABLE_ENV, "")), os.environ.get(RUN_ID_ENV, "")
    )


@functools.cache
def _sandbox_hostname(base_callable: str) -> str:
    # A name lookup each time would cost every heartbeat; the sandbox's name does not change under a run.
    path = (base_callable or AIRFLOW_DEFAULT_CALLABLE).replace(":", ".")
    module, _, name = path.rpartition(".")
    return str(getattr(importlib.import_module(module), name)())

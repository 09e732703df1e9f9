"""What must happen in the demo: its Lambda function's limits, the outcome declared for each task, and the check.

Declared, not inferred: the observations come from Airflow (``observed.py``) and are compared with ``EXPECTED``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from devtools.demo.observed import Observed, parse_timestamp
from hybrid_router.router.external_id import split_child_id

MAIN_DAG = "hybrid_router_demo"
FAILURE_DAG = "hybrid_router_demo_own_failure"
MEMORY_DAG = "hybrid_router_demo_memory"  # run twice: the second run shows what the router learned
FUNCTION_NAME = "hybrid-router-demo"  # the policy's `lambda` executor names this function
BIG_FUNCTION_NAME = "hybrid-router-demo-3g"  # and its `lambda_3g` executor this one
LAMBDA = "lambda"
LAMBDA_3G = "lambda_3g"
LOCAL = "local"

# The demo function. A normal demo task peaks at about 285 MB inside a sandbox (handler, Airflow's supervisor and
# task runner; the "Max Memory Used" of the local service's REPORT lines), so 512 MB fits it and the memory hog's
# 1.2 GB does not. A warm sandbox starts a task in well under a second (the handler forks it from a process that
# imported Airflow once); a cold one pays that import, a few seconds on a busy two-core machine. 15 s leaves room
# for that, and `too_slow` sleeps longer than the whole timeout.
FUNCTION_MEMORY_MB = 512
FUNCTION_TIMEOUT_S = 15
RESERVED_CONCURRENCY = 3
# The bigger function: the memory hog's 1.2 GB fits it. One task at a time is all the demo needs of it, and no
# task outlives it: its timeout leaves a cold start on a loaded machine all the room it needs.
BIG_FUNCTION_MEMORY_MB = 3008
BIG_FUNCTION_TIMEOUT_S = 60
BIG_RESERVED_CONCURRENCY = 1


@dataclass(frozen=True)
class Expected:
    """What must happen to one task (every mapped instance of it when ``mapped``)."""

    dag_id: str
    task_id: str
    paths: tuple[tuple[str, ...], ...]  # executor paths accepted, e.g. (("lambda", "local"),) for a fallback
    state: str
    rule: str
    fallback_reason: str | None = None
    mapped: bool = False
    why: str = ""
    run: int = 1  # which run of its DAG, in the order the demo triggers them
    memory_source: str | None = None  # where the router took the task's memory need from, when it matters


# Declared, not inferred: the report's observations come from Airflow and are compared with this table.
EXPECTED: tuple[Expected, ...] = (
    Expected(MAIN_DAG, "short_task", ((LAMBDA,),), "success", "short and small", why="short -> Lambda"),
    Expected(
        MAIN_DAG,
        "long_task",
        ((LOCAL,),),
        "success",
        "everything else",
        why="expected 40m from its execution_timeout -> Local",
    ),
    Expected(
        MAIN_DAG, "pinned_task", ((LAMBDA,),), "success", "pinned to lambda by queue", why='queue="lambda"'
    ),
    Expected(
        MAIN_DAG,
        "burst",
        ((LAMBDA,), (LOCAL,)),
        "success",
        "short and small",
        mapped=True,
        why="burst of 8 > reserved concurrency 3: the rest overflow to Local",
    ),
    Expected(
        MAIN_DAG,
        "too_slow",
        ((LAMBDA, LOCAL),),
        "success",
        "short and small",
        fallback_reason="timeout",
        why="outlives the function timeout -> fallback",
    ),
    Expected(
        MEMORY_DAG,
        "memory_hog",
        ((LAMBDA, LAMBDA_3G),),
        "success",
        "short and small",
        fallback_reason="out_of_memory",
        memory_source="policy_default",
        why="exceeds the small function's memory -> the same try on lambda_3g",
    ),
    Expected(
        MEMORY_DAG,
        "memory_hog",
        ((LAMBDA_3G,),),
        "success",
        "short and small",
        run=2,
        memory_source="out_of_memory",
        why="ran out of memory on lambda before -> lambda_3g directly",
    ),
    Expected(
        FAILURE_DAG,
        "fails_by_its_own_code",
        ((LAMBDA,),),
        "failed",
        "short and small",
        why="its own bug: fails, no fallback",
    ),
)
# Each DAG's runs' final states, in the order the demo triggers them: the main DAG's tasks all end in success,
# the failing task's DAG fails, the memory hog's DAG succeeds both times.
EXPECTED_RUN_STATES = {
    MAIN_DAG: ["success"],
    FAILURE_DAG: ["failed"],
    MEMORY_DAG: ["success", "success"],
}
# The burst is larger than the function's reserved concurrency, so some of it must overflow, and some of it
# must still have run on Lambda (the DAG orders its tasks so that Lambda has free slots when the burst starts).
BURST_TASK = "burst"


@dataclass
class Verdict:
    observed: Observed
    expected: Expected | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(
    expected: Sequence[Expected],
    observed: Sequence[Observed],
    run_states: dict[str, list[str | None]],
    expected_run_states: dict[str, list[str]] = EXPECTED_RUN_STATES,
) -> tuple[list[Verdict], list[str]]:
    """Compare observations with the declared expectations.

    ``run_states`` has each DAG's runs' final states in the order they were triggered. Returns one verdict per
    observed task instance and the problems that belong to no single task (a missing task, a DAG run in the
    wrong state, a burst that did not overflow).
    """
    general: list[str] = []
    for dag_id, states in expected_run_states.items():
        if run_states.get(dag_id) != states:
            general.append(f"DAG runs of {dag_id} ended {run_states.get(dag_id)!r}, expected {states!r}")
    by_task = {(e.dag_id, e.task_id, e.run): e for e in expected}
    verdicts = [_check_one(by_task.get((o.dag_id, o.task_id, o.run)), o) for o in observed]
    seen = {(o.dag_id, o.task_id, o.run) for o in observed}
    general.extend(
        f"{e.dag_id}.{e.task_id} did not run{f' in run {e.run}' if e.run > 1 else ''} (no task instance)"
        for e in expected
        if (e.dag_id, e.task_id, e.run) not in seen
    )
    burst = [o for o in observed if o.task_id == BURST_TASK and o.dag_id == MAIN_DAG]
    if burst:
        overflowed = sum(1 for o in burst if "overflow" in o.how)
        on_lambda = sum(1 for o in burst if o.executors == [LAMBDA])
        if not overflowed:
            general.append(
                f"no {BURST_TASK} task overflowed, though the burst is larger than the function's slots"
            )
        if not on_lambda:
            general.append(f"no {BURST_TASK} task ran on Lambda")
    busiest = max_concurrent([o for o in observed if o.executors == [LAMBDA]])
    if busiest > RESERVED_CONCURRENCY:
        general.append(
            f"{busiest} tasks ran on Lambda at once, more than its reserved concurrency {RESERVED_CONCURRENCY}"
        )
    return verdicts, general


def max_concurrent(runs: Sequence[Observed]) -> int:
    """The most runs whose [start_date, end_date) intervals overlap at one moment."""
    edges = sorted(
        edge
        for run in runs
        if run.start_date and run.end_date
        for edge in ((parse_timestamp(run.start_date), 1), (parse_timestamp(run.end_date), -1))
    )
    # An end sorts before a start at the same instant (-1 < 1): back-to-back runs do not overlap.
    busiest = current = 0
    for _, change in edges:
        current += change
        busiest = max(busiest, current)
    return busiest


def _check_one(expected: Expected | None, seen: Observed) -> Verdict:
    verdict = Verdict(seen, expected)
    problems = verdict.problems
    if expected is None:
        problems.append("not declared in the demo's expectations")
        return verdict
    if expected.mapped != (seen.map_index >= 0):
        problems.append("expected a mapped task" if expected.mapped else "expected an unmapped task")
    if seen.state != expected.state:
        problems.append(f"state {seen.state!r}, expected {expected.state!r}")
    path = tuple(seen.executors)
    if path not in expected.paths:
        shown = " or ".join(" -> ".join(p) for p in expected.paths)
        problems.append(f"ran on {' -> '.join(path) or 'nothing'}, expected {shown}")
    if seen.rule != expected.rule:
        problems.append(f"rule {seen.rule!r}, expected {expected.rule!r}")
    if expected.memory_source is not None and seen.memory_source != expected.memory_source:
        problems.append(f"memory from {seen.memory_source!r}, expected {expected.memory_source!r}")
    if path == (LOCAL,) and expected.mapped and seen.how != ["overflow"]:
        # A burst task on Local is only right as an overflow from Lambda, not as a policy decision.
        problems.append(f"went to Local by {seen.how}, expected an overflow")
    wanted_reasons = [expected.fallback_reason] if expected.fallback_reason else []
    if seen.fallback_reasons != wanted_reasons:
        problems.append(f"fallback reasons {seen.fallback_reasons}, expected {wanted_reasons}")
    if seen.other_events:
        problems.append(f"unexpected router events: {'; '.join(seen.other_events)}")
    if seen.try_number != 1:
        problems.append(f"try {seen.try_number}: a fallback must not spend a retry")
    final_child, _ = split_child_id(seen.external_executor_id)
    if path and final_child != path[-1]:
        problems.append(f"external_executor_id {seen.external_executor_id!r} disagrees with the audit rows")
    return verdict


def check_explanation(explanation: dict) -> list[str]:
    """Problems with ``explain``'s answer for the memory hog after its runs: it must name the bigger function
    and say the memory need came from the out-of-memory on the small one."""
    if explanation["returncode"] != 0:
        return [f"explain failed with exit code {explanation['returncode']}: {explanation['errors'].strip()}"]
    lines = explanation["output"].splitlines()
    problems = []
    if not lines or not lines[0].endswith(f" -> {LAMBDA_3G}"):
        problems.append(f"explain does not send the memory hog to {LAMBDA_3G}: {lines[:1]}")
    learned = f"memory:     more than {FUNCTION_MEMORY_MB} MB: out of memory on {LAMBDA} at "
    if not any(line.strip().startswith(learned.strip()) for line in lines):
        problems.append(f"explain does not name the memory the router learned ({learned.strip()}...)")
    return problems

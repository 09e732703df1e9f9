"""What a policy's decisions would cost, how long their tasks would wait to start, and which runs would fall back:
the part of ``simulate`` that prices a decision, from the measured history in Airflow's metadata database.

The history is read with three queries: the successful runs of each task (``history.py``), the runs the router
measured (``measured_runs.py``: executor, outcome, memory size, peak, duration), and the hand-overs that give each
executor's start latency (``start_latency.py``).

Expected fallbacks replay each task's measured runs against the executor a policy chose for it. A run dies there
of ``out_of_memory`` when it peaked above the executor's memory size, or ran out of memory on a function no
bigger; of ``timeout`` when it ran longer than the executor's ``max_duration``, timed out under a limit no
longer, or timed out on that very executor; of any other infrastructure reason (a crash, a dead letter,
throttling, ...) when it died of it on that very executor. The task's runs are expected to die in the same
proportion. Such a run goes to the first executor of the decision's fallback list for that reason (a fallback)
or, with none, fails its try. Both runs are billed whole: the one that died on its executor and the re-run on
the fallback executor, each at the task's mean duration, and the re-run waits the fallback executor's start
latency.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hybrid_router.router.history import TaskKey, TaskRunStats, read_task_run_stats
from hybrid_router.router.measured_runs import (
    OUT_OF_MEMORY,
    FinishedRun,
    memory_evidence,
    read_finished_runs,
    summarise_memory,
)
from hybrid_router.router.policy import FAILURE_REASONS, MemoryEvidence
from hybrid_router.router.pricing import LAMBDA, Billing, PriceTable
from hybrid_router.router.start_latency import MEASURED, StartLatencies, StartLatency, read_start_latencies

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from hybrid_router.router.policy import Decision, ExecutorSpec, Policy

TIMEOUT = "timeout"


@dataclass(frozen=True)
class MeasuredHistory:
    """What the metadata database says about recent runs; empty for a task table read from a CSV file."""

    stats: Mapping[TaskKey, TaskRunStats] = field(default_factory=dict)
    runs: Mapping[TaskKey, tuple[FinishedRun, ...]] = field(default_factory=dict)
    latencies: StartLatencies = field(default_factory=StartLatencies)

    def memory(self) -> Callable[[str, str], MemoryEvidence | None]:
        """The policy engine's memory lookup over the measured runs (``resolve_facts(memory=...)``)."""
        tasks = summarise_memory(run for runs in self.runs.values() for run in runs)
        return lambda dag_id, task_id: memory_evidence(tasks.get((dag_id, task_id)))


def read_measured_history(session: Session, *, days: float) -> MeasuredHistory:
    """The last ``days`` days of runs, measurements and hand-overs, with three queries."""
    runs: dict[TaskKey, list[FinishedRun]] = defaultdict(list)
    for run in read_finished_runs(session, days=days):
        runs[(run.dag_id, run.task_id)].append(run)
    return MeasuredHistory(
        stats=read_task_run_stats(session, days=days),
        runs={key: tuple(values) for key, values in runs.items()},
        latencies=read_start_latencies(session, days=days),
    )


@dataclass
class Charge:
    """What some runs on one executor add up to."""

    cost_usd: float = 0.0
    start_latency_s: float = 0.0
    runs: float = 0.0
    seconds: float = 0.0
    fallback_runs: float = 0.0  # of ``runs``: re-runs of tries that died elsewhere


@dataclass
class RowCost:
    """One task row priced: its runs on the chosen executor, and the re-runs expected on fallback executors."""

    charges: dict[str, Charge] = field(default_factory=dict)
    fallbacks: dict[str, float] = field(default_factory=dict)  # by reason: expected re-dispatched runs
    failed_tries: float = 0.0  # expected deaths with no fallback for their reason


class Costing:
    """Prices decisions of one policy with ``prices``, the start latencies and the runs of ``history``."""

    def __init__(self, policy: Policy, prices: PriceTable, history: MeasuredHistory) -> None:
        self.policy = policy
        self.prices = prices
        self.history = history
        self._billing = {name: prices.billing(spec) for name, spec in policy.executors.items()}

    def latency(self, executor: str) -> StartLatency:
        return self.history.latencies.of(self.policy.executors[executor])

    def price(self, decision: Decision, key: TaskKey, runs: int, seconds: float) -> RowCost:
        """``runs`` runs of task ``key`` taking ``seconds`` in all, sent where ``decision`` says."""
        mean = seconds / runs if runs else 0.0
        row = RowCost()
        self._charge(row, decision.executor, runs, mean)
        deaths = expected_deaths(
            self.history.runs.get(key, ()),
            self.policy.executors[decision.executor],
            self._billing[decision.executor],
            self.policy.executors,
        )
        for reason, share in deaths.items():
            expected = share * runs
            targets = decision.fallback_for(reason)
            if not targets:
                row.failed_tries += expected
                continue
            row.fallbacks[reason] = row.fallbacks.get(reason, 0.0) + expected
            self._charge(row, targets[0], expected, mean, fallback=True)
        return row

    def _charge(
        self, row: RowCost, executor: str, runs: float, mean: float, *, fallback: bool = False
    ) -> None:
        charge = row.charges.setdefault(executor, Charge())
        charge.runs += runs
        charge.fallback_runs += runs if fallback else 0.0
        charge.seconds += runs * mean
        charge.cost_usd += self._billing[executor].run_cost(mean, runs)
        charge.start_latency_s += self.latency(executor).seconds * runs

    def notes(self, executors: Iterable[str]) -> list[str]:
        """How each of ``executors`` was priced and how its start latency was found; assumptions first."""
        assumed, known = [], []
        for name in sorted(executors):
            billing, latency = self._billing[name], self.latency(name)
            line = f"{name}: {billing.description}"
            if billing.assumed:
                line += f" ({'; '.join(billing.assumed)})"
            line += f"; start latency {latency.describe()}"
            (assumed if billing.assumed or latency.source != MEASURED else known).append(line)
        return assumed + known


def expected_deaths(
    runs: Iterable[FinishedRun], spec: ExecutorSpec, billing: Billing, executors: Mapping[str, ExecutorSpec]
) -> dict[str, float]:
    """The share of ``runs`` that would die on ``spec``, by reason (see the module docstring)."""
    runs = list(runs)
    if not runs:
        return {}
    memory = billing.memory_mb if billing.kind == LAMBDA else spec.limits.max_memory_mb
    deaths: dict[str, int] = defaultdict(int)
    for run in runs:
        reason = _dies_on(run, spec.name, memory, spec.limits.max_duration_s, executors)
        if reason is not None:
            deaths[reason] += 1
    return {reason: count / len(runs) for reason, count in deaths.items()}


def _dies_on(
    run: FinishedRun,
    name: str,
    memory_mb: int | None,
    max_duration_s: float | None,
    executors: Mapping[str, ExecutorSpec],
) -> str | None:
    if run.outcome == OUT_OF_MEMORY:
        # the task needed more than the size it died on; an unknown size is known to be too small only there
        too_small = (
            run.memory_size_mb is not None and memory_mb is not None and memory_mb <= run.memory_size_mb
        )
        return OUT_OF_MEMORY if too_small or (run.memory_size_mb is None and run.executor == name) else None
    if run.outcome == TIMEOUT:
        # On the very executor it timed out on it times out again, whatever limit the policy declares (a
        # function's real timeout may be shorter than its ``max_duration``).
        ran_over = _timed_out_after(run, executors)
        too_short = ran_over is not None and max_duration_s is not None and max_duration_s <= ran_over
        return TIMEOUT if too_short or run.executor == name else None
    if run.outcome in FAILURE_REASONS:
        return run.outcome if run.executor == name else None
    if memory_mb is not None and run.peak_mb is not None and run.peak_mb > memory_mb:
        return OUT_OF_MEMORY
    if max_duration_s is not None and run.duration_ms is not None and run.duration_ms / 1000 > max_duration_s:
        return TIMEOUT
    return None


def _timed_out_after(run: FinishedRun, executors: Mapping[str, ExecutorSpec]) -> float | None:
    """Seconds the timed-out run is known to have needed more than: its duration, else its executor's limit."""
    if run.duration_ms is not None:
        return run.duration_ms / 1000
    spec = executors.get(run.executor)
    return spec.limits.max_duration_s if spec is not None else None

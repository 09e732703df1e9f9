"""``hybrid-router recommend``: for each task, the cheapest executor (and Lambda function size) that fits its
measured p95 duration and memory with headroom, written as a policy that validates.

A task's needs: the p95 of its successful runs' worker time times the headroom, and its learned memory need
(``learned_memory_need``: the p95 of its measured peaks times the same headroom, or more than the largest
function it ran out of memory on); the policy's ``defaults.memory_mb`` when nothing was measured. An executor
fits when its ``max_duration`` and its memory (the Lambda function's or Fargate task's size, and
``limits.max_memory_mb``) hold them. Besides the policy's executors, a Lambda function of the smallest standard
size that fits is a candidate, modelled on the policy's first Lambda executor. Among those that fit, the cheapest
per run at the task's mean duration wins; a tie goes to the quicker start. An executor nobody gave a price for
(a slot at the default $0) is not free, merely unpriced: a task it runs today stays there (nothing to compare
with), and it takes another task only when nothing priced fits.

The proposal is the whole policy with one rule per task whose executor changes, ahead of the policy's own rules.
Each such rule holds the task only while it fits the executor's limits and falls back and overflows to the
executor the policy sends every other task to.
"""

from __future__ import annotations

import copy
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from hybrid_router.router.policy import (
    ExecutorSpec,
    Limits,
    MemoryEvidence,
    Policy,
    TaskFacts,
    format_duration,
    learned_memory_need,
)
from hybrid_router.router.pricing import FARGATE, LAMBDA, Billing, PriceTable
from hybrid_router.router.start_latency import StartLatencies

# Lambda takes any size from 128 MB to 10,240 MB in 1 MB steps; proposing these few lets tasks share functions.
LAMBDA_SIZES_MB = (128, 256, 512, 1024, 1536, 2048, 3008, 4096, 6144, 8192, 10240)
LAMBDA_MAX_DURATION_S = 900.0
RULE_PREFIX = "recommended: "


@dataclass(frozen=True)
class TaskNeed:
    """What one task needs, from its measured runs (or a task table)."""

    dag_id: str
    task_id: str
    runs: int
    mean_s: float
    p95_s: float
    memory_mb: int | None  # with headroom; None when nothing says
    memory_basis: str  # "1,824 MB: p95 of 14 runs x 1.2"
    queue: str | None = None
    pool: str | None = None
    operator: str | None = None


@dataclass(frozen=True)
class Candidate:
    spec: ExecutorSpec
    billing: Billing
    start_latency_s: float
    new: bool  # a Lambda function size the policy does not have yet
    pricing_entry: Mapping[str, Any] = field(default_factory=dict)

    def cost(self, seconds: float) -> float:
        return self.billing.run_cost(seconds)


@dataclass(frozen=True)
class Advice:
    need: TaskNeed
    duration_need_s: float
    memory_need_mb: int
    current: str
    current_cost_usd: float  # per run
    current_fits: bool
    proposed: Candidate | None  # None: nothing the policy knows fits
    proposed_cost_usd: float | None

    @property
    def changes(self) -> bool:
        return self.proposed is not None and self.proposed.spec.name != self.current

    def to_dict(self) -> dict[str, Any]:
        return {
            "dag_id": self.need.dag_id,
            "task_id": self.need.task_id,
            "runs": self.need.runs,
            "p95_s": round(self.need.p95_s, 3),
            "duration_need_s": round(self.duration_need_s, 3),
            "memory_need_mb": self.memory_need_mb,
            "memory_basis": self.need.memory_basis,
            "current": self.current,
            "current_cost_usd": round(self.current_cost_usd, 8),
            "current_fits": self.current_fits,
            "proposed": self.proposed.spec.name if self.proposed else None,
            "proposed_cost_usd": None if self.proposed_cost_usd is None else round(self.proposed_cost_usd, 8),
            "new_executor": bool(self.proposed and self.proposed.new),
        }


def need_from_measurements(
    *,
    dag_id: str,
    task_id: str,
    runs: int,
    worker_seconds: float,
    p95_s: float,
    evidence: MemoryEvidence | None,
    policy: Policy,
    headroom: float,
    queue: str | None = None,
    pool: str | None = None,
    operator: str | None = None,
) -> TaskNeed:
    learned = (
        None
        if evidence is None
        else learned_memory_need(evidence, headroom=headroom, min_runs=policy.learn_after_runs)
    )
    if learned is None:
        memory, basis = None, f"not measured: the policy's default {policy.defaults.memory_mb:,} MB"
    else:
        memory, basis = learned.mb, learned.basis
    return TaskNeed(dag_id, task_id, runs, worker_seconds / runs, p95_s, memory, basis, queue, pool, operator)


class Recommender:
    """Proposes an executor per task for ``policy`` under ``prices`` (see the module docstring)."""

    def __init__(
        self, policy: Policy, prices: PriceTable, latencies: StartLatencies, *, headroom: float
    ) -> None:
        if not (math.isfinite(headroom) and headroom >= 1):
            raise ValueError(f"headroom must be a finite number >= 1, got {headroom!r}")
        self.policy = policy
        self.prices = prices
        self.latencies = latencies
        self.headroom = headroom
        self._existing = [self._candidate(spec, prices, new=False) for spec in policy.executors.values()]
        self._template = next((c for c in self._existing if c.billing.kind == LAMBDA), None)

    def advise(self, need: TaskNeed) -> Advice:
        duration = need.p95_s * self.headroom
        memory = need.memory_mb or self.policy.defaults.memory_mb
        facts = TaskFacts(
            dag_id=need.dag_id,
            task_id=need.task_id,
            queue=need.queue,
            pool=need.pool,
            operator=need.operator,
            expected_duration_s=need.p95_s,
            duration_source="measured p95",
            memory_mb=memory,
            memory_source="measured",
        )
        current = self.policy.decide(facts).executor
        here = next(c for c in self._existing if c.spec.name == current)
        here_fits = _fits(here, duration, memory)
        fitting = [c for c in self._candidates(memory) if _fits(c, duration, memory)]
        if here_fits and not here.billing.priced:
            fitting = [here]
        priced = [c for c in fitting if c.billing.priced] or fitting
        best = min(
            priced,
            key=lambda c: (c.cost(need.mean_s), c.start_latency_s, c.new, c.spec.name),
            default=None,
        )
        current_cost = here.cost(need.mean_s)
        return Advice(
            need,
            duration,
            memory,
            current,
            current_cost,
            here_fits,
            best,
            None if best is None else best.cost(need.mean_s),
        )

    def _candidates(self, memory_mb: int) -> list[Candidate]:
        found = list(self._existing)
        size = next((size for size in LAMBDA_SIZES_MB if size >= memory_mb), None)
        template = self._template
        if template is None or size is None:
            return found
        same = [c for c in self._existing if c.billing.kind == LAMBDA and c.billing.memory_mb == size]
        if same:
            return found
        name = f"{template.spec.name}_{size}mb"
        if name in self.policy.executors:
            return found
        options = dict(template.spec.options)
        if isinstance(options.get("function_name"), str):
            options["function_name"] = f"{options['function_name']}-{size}mb"
        max_duration = template.spec.limits.max_duration_s or LAMBDA_MAX_DURATION_S
        spec = replace(
            template.spec,
            name=name,
            limits=Limits(max_duration_s=max_duration, max_memory_mb=size),
            options=options,
        )
        entry = {
            key: value for key, value in self.prices.entry(template.spec.name).items() if key != "memory_mb"
        }
        found.append(self._candidate(spec, self.prices.with_entry(name, entry), new=True, entry=entry))
        return found

    def _candidate(
        self, spec: ExecutorSpec, prices: PriceTable, *, new: bool, entry: Mapping[str, Any] | None = None
    ) -> Candidate:
        return Candidate(spec, prices.billing(spec), self.latencies.of(spec).seconds, new, dict(entry or {}))


def _fits(candidate: Candidate, duration_s: float, memory_mb: int) -> bool:
    limits = candidate.spec.limits
    sizes = [limits.max_memory_mb]
    if candidate.billing.kind in (LAMBDA, FARGATE):
        sizes.append(candidate.billing.memory_mb)
    capacity = min((size for size in sizes if size is not None), default=None)
    fits_time = limits.max_duration_s is None or duration_s <= limits.max_duration_s
    return fits_time and (capacity is None or memory_mb <= capacity)


# -- the proposal as a policy ---------------------------------------------------------------------------------


def proposal_text(
    policy_data: Mapping[str, Any],
    policy: Policy,
    advice: Sequence[Advice],
    *,
    source: str,
    prices: PriceTable,
    headroom: float,
    skipped: Iterable[str] = (),
) -> str:
    """The whole policy with a rule per task whose executor changes: YAML that ``load_policy`` accepts."""
    data = copy.deepcopy(dict(policy_data))
    home = _home(policy)
    taken = {rule.name for rule in policy.rules}
    rules_text, added = [], {}
    for item in advice:
        if not item.changes or item.proposed is None:
            continue
        proposed = item.proposed
        if proposed.new:
            added[proposed.spec.name] = proposed
        name = _unique(f"{RULE_PREFIX}{item.need.dag_id}.{item.need.task_id}", taken)
        rule: dict[str, Any] = {"name": name, "if": _conditions(item.need, proposed.spec.limits)}
        rule["run_on"] = proposed.spec.name
        if home is not None and home != proposed.spec.name:
            rule["overflow"] = [home]
            rule["fallback"] = [home]
        rules_text.append(textwrap.indent(_comment(_why(item)) + _dump([rule]), "  "))
    for name, candidate in added.items():
        data.setdefault("executors", {})[name] = _executor_data(candidate.spec)
        if candidate.pricing_entry:
            data.setdefault("pricing", {}).setdefault("executors", {})[name] = dict(candidate.pricing_entry)
    original = data.pop("rules", [])
    header = _header(
        policy, advice, source=source, prices=prices, headroom=headroom, added=added, skipped=skipped
    )
    body = _dump(data) + "rules:\n" + "".join(rules_text)
    return header + body + textwrap.indent(_dump(original), "  ")


def _home(policy: Policy) -> str | None:
    """The executor the policy sends every task no rule takes (unlimited by construction)."""
    if policy.defaults.run_on is not None:
        return policy.defaults.run_on
    for rule in policy.rules:
        if rule.is_catch_all:
            return next((n for n in rule.run_on if policy.executors[n].limits.is_unlimited), None)
    return None


def _conditions(need: TaskNeed, limits: Limits) -> dict[str, Any]:
    conditions: dict[str, Any] = {
        "dag_id": _literal_glob(need.dag_id),
        "task_id": _literal_glob(need.task_id),
    }
    # the rule lets go of a task that outgrows the executor: later rules route it
    if limits.max_duration_s is not None:
        conditions["expected_duration"] = f"<= {format_duration(limits.max_duration_s)}"
    if limits.max_memory_mb is not None:
        conditions["memory_mb"] = f"<= {limits.max_memory_mb}"
    return conditions


def _literal_glob(text: str) -> str:
    return "".join(f"[{char}]" if char in "*?[" else char for char in text)


def _executor_data(spec: ExecutorSpec) -> dict[str, Any]:
    data: dict[str, Any] = {"class": spec.class_path}
    if spec.max_concurrency is not None:
        data["max_concurrency"] = spec.max_concurrency
    limits = {}
    if spec.limits.max_duration_s is not None:
        limits["max_duration"] = format_duration(spec.limits.max_duration_s)
    if spec.limits.max_memory_mb is not None:
        limits["max_memory_mb"] = spec.limits.max_memory_mb
    data["limits"] = limits
    if spec.options:
        data["options"] = dict(spec.options)
    return data


def _why(item: Advice) -> str:
    proposed = item.proposed
    assert proposed is not None
    new = " (a new function)" if proposed.new else ""
    return (
        f"{item.need.dag_id}.{item.need.task_id}: {item.need.runs} runs, p95 {format_duration(item.need.p95_s)}"
        f" x {_headroom(item)} = {format_duration(item.duration_need_s)}; memory {item.need.memory_basis}."
        f" {item.current} ${item.current_cost_usd:.6f}/run{'' if item.current_fits else ' (does not fit)'}"
        f" -> {proposed.spec.name}{new}"
        f" ${item.proposed_cost_usd:.6f}/run"
    )


def _headroom(item: Advice) -> str:
    return f"{item.duration_need_s / item.need.p95_s:g}" if item.need.p95_s else "1"


def _header(
    policy: Policy,
    advice: Sequence[Advice],
    *,
    source: str,
    prices: PriceTable,
    headroom: float,
    added: Mapping[str, Candidate],
    skipped: Iterable[str],
) -> str:
    changed = [item for item in advice if item.changes]
    runs_before = sum(item.current_cost_usd * item.need.runs for item in changed)
    runs_after = sum((item.proposed_cost_usd or 0.0) * item.need.runs for item in changed)
    lines = [
        f"Proposed by `airflow hybrid-router recommend` from {policy.source}, for the runs in {source}.",
        f"Prices: {prices.describe()}. Headroom: x{headroom:g} on each task's p95 duration and memory.",
        f"{len(changed)} of {len(advice)} tasks move; at the measured run counts, "
        f"${runs_before:.4f} -> ${runs_after:.4f}.",
        "A task is taken to run as long on every executor; a bigger Lambda function has more CPU and may run"
        " faster.",
    ]
    lines += [
        f"New executor {name}: a Lambda function of {c.spec.limits.max_memory_mb:,} MB"
        f" ({c.spec.options.get('function_name', 'its function_name')}) to create before using this policy."
        for name, c in added.items()
    ]
    lines += [
        f"{item.need.dag_id}.{item.need.task_id}: no executor fits {format_duration(item.duration_need_s)}"
        f" and {item.memory_need_mb:,} MB; it stays as it is."
        for item in advice
        if item.proposed is None
    ]
    lines += [f"Not judged: {text}" for text in skipped]
    lines += [
        f"{name}: {billing.assumed[0]}" + ("; its tasks stay there" if not billing.priced else "")
        for name, billing in ((n, prices.billing(s)) for n, s in policy.executors.items())
        if billing.assumed
    ]
    return _comment(*lines)


def _comment(*lines: str) -> str:
    return "".join(
        f"# {wrapped}\n" for line in lines for wrapped in textwrap.wrap(line, 100, break_on_hyphens=False)
    )


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name} ({number})", number + 1
    taken.add(candidate)
    return candidate


def _dump(value: Any) -> str:
    # flow style for the innermost mappings and lists, as the shipped policies write them
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=None, allow_unicode=True, width=110)


def advise_all(recommender: Recommender, needs: Iterable[TaskNeed]) -> list[Advice]:
    return [recommender.advise(need) for need in sorted(needs, key=lambda n: (n.dag_id, n.task_id))]

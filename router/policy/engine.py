"""A loaded policy and its decisions: pure, fast, and cached per TaskFacts."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from cachetools import LRUCache

from .conditions import Condition, Subject
from .errors import PolicyIssue
from .facts import count_runs, learned_memory_need
from .model import (
    SOURCE_POLICY_DEFAULT,
    SOURCE_TASK_FACTS,
    Decision,
    Defaults,
    ExecutorSpec,
    FallbackByReason,
    FallbackMode,
    TaskFacts,
)
from .units import format_duration, is_plain_number

DEFAULT_CACHE_SIZE = 65536
DEFAULTS_RULE_NAME = "defaults.run_on"
DEFAULT_MEMORY_HEADROOM = 1.2
DEFAULT_LEARN_AFTER_RUNS = 5


@dataclass(frozen=True)
class Rule:
    """One routing rule; ``conditions`` is empty for a catch-all (a rule without ``if``).

    ``run_on`` names executors smallest first (a single name may be given as a string): a task goes to the
    first whose limits it fits. ``fallback`` serves every failure reason ``fallback_by_reason`` does not name.
    """

    index: int
    name: str
    conditions: tuple[Condition, ...]
    run_on: tuple[str, ...]
    overflow: tuple[str, ...]
    fallback: tuple[str, ...]
    line: int
    fallback_by_reason: FallbackByReason = ()

    def __post_init__(self) -> None:
        if isinstance(self.run_on, str):
            object.__setattr__(self, "run_on", (self.run_on,))
        if not self.run_on:
            raise ValueError(f"rule {self.name!r} needs at least one run_on executor")

    @property
    def is_catch_all(self) -> bool:
        return not self.conditions

    @property
    def fallback_executors(self) -> tuple[str, ...]:
        """Every executor of every fallback list, once each."""
        by_reason = (name for _, names in self.fallback_by_reason for name in names)
        return tuple(dict.fromkeys((*self.fallback, *by_reason)))


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class Policy:
    """Executors, defaults and rules of one policy file; ``decide`` says where a task runs."""

    def __init__(
        self,
        *,
        source: str,
        version: int,
        executors: Mapping[str, ExecutorSpec],
        defaults: Defaults,
        rules: Sequence[Rule],
        warnings: Sequence[PolicyIssue] = (),
        fallback_mode: FallbackMode = "same_try",
        max_fallbacks: int = 2,
        memory_headroom: float = DEFAULT_MEMORY_HEADROOM,
        learn_after_runs: int = DEFAULT_LEARN_AFTER_RUNS,
        cache_size: int = DEFAULT_CACHE_SIZE,
        pricing: Mapping[str, Any] | None = None,
    ):
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        if not (is_plain_number(memory_headroom) and memory_headroom >= 1):
            raise ValueError(f"memory_headroom must be a finite number >= 1, got {memory_headroom!r}")
        if learn_after_runs < 1:
            raise ValueError(f"learn_after_runs must be at least 1, got {learn_after_runs}")
        _check_every_task_has_a_home(executors, defaults, rules)
        self.source = source
        self.version = version
        self.executors: dict[str, ExecutorSpec] = dict(executors)
        self.defaults = defaults
        self.rules: list[Rule] = list(rules)
        self.warnings: list[PolicyIssue] = list(warnings)
        self.fallback_mode = fallback_mode
        self.max_fallbacks = max_fallbacks
        self.memory_headroom = memory_headroom
        self.learn_after_runs = learn_after_runs
        # the policy's ``pricing`` section as checked (policy/prices.py); read by simulate and recommend only
        self.pricing: dict[str, Any] = dict(pricing or {})
        # (max duration, max memory) per executor with inf for "no limit": two float compares per check
        self._bounds = {name: spec.limits.bounds() for name, spec in self.executors.items()}
        self._cache: LRUCache[TaskFacts, Decision] = LRUCache(maxsize=cache_size)
        self._cache_lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def __repr__(self) -> str:
        return f"<Policy {self.source!r}: {len(self.executors)} executors, {len(self.rules)} rules>"

    def decide(self, facts: TaskFacts) -> Decision:
        """The decision for ``facts``, from the cache when the same facts were decided before."""
        with self._cache_lock:
            decision = self._cache.get(facts)
            if decision is not None:
                self._hits += 1
                return decision
            self._misses += 1
        decision = self.decide_uncached(facts)
        with self._cache_lock:
            self._cache[facts] = decision
        return decision

    def cache_info(self) -> CacheInfo:
        with self._cache_lock:
            return CacheInfo(self._hits, self._misses, self._cache.maxsize, self._cache.currsize)

    def cache_clear(self) -> None:
        with self._cache_lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def decide_uncached(self, facts: TaskFacts) -> Decision:
        """First rule whose conditions hold and whose executor can take the task; else defaults.run_on."""
        return self._decide(facts, explain=False)

    def explain(self, facts: TaskFacts) -> Decision:
        """The same decision as ``decide``, whose reasons also say why each earlier rule did not match.

        Not cached, and slower with many rules: meant for people (the ``explain`` command), not the scheduler.
        """
        return self._decide(facts, explain=True)

    def _decide(self, facts: TaskFacts, *, explain: bool) -> Decision:
        subject = self._subject(facts)
        duration, memory = subject.duration_s, subject.memory_mb
        bounds = self._bounds
        passed_over: list[str] = []  # rules that did not take the task, when it matters to say why
        for rule in self.rules:
            for condition in rule.conditions:
                if not condition.matches(subject):
                    if explain:
                        passed_over.append(
                            f"rule {rule.name!r} does not match: {condition.describe_mismatch(subject)}"
                        )
                    break
            else:
                for name in rule.run_on:
                    max_duration, max_memory = bounds[name]
                    if duration <= max_duration and memory <= max_memory:
                        return self._decision(subject, passed_over, rule, name)
                breaches = [self._breaches(name, subject) for name in rule.run_on]
                passed_over.append(f"rule {rule.name!r} skipped: {'; '.join(breaches)}")
        return self._decision(subject, passed_over)

    def _breaches(self, executor: str, subject: Subject) -> str:
        """Each limit of ``executor`` the task exceeds, in one sentence; empty when it fits."""
        return "; ".join(
            self.executors[executor].limits.breaches(executor, subject.duration_s, subject.memory_mb)
        )

    def _subject(self, facts: TaskFacts) -> Subject:
        if facts.expected_duration_s is None:
            duration, duration_source = self.defaults.expected_duration_s, SOURCE_POLICY_DEFAULT
        else:
            duration, duration_source = facts.expected_duration_s, facts.duration_source or SOURCE_TASK_FACTS
        memory_basis = None
        if facts.memory_mb is not None:
            memory, memory_source = facts.memory_mb, facts.memory_source or SOURCE_TASK_FACTS
        else:
            evidence = facts.memory_evidence
            learned = (
                None
                if evidence is None
                else learned_memory_need(
                    evidence, headroom=self.memory_headroom, min_runs=self.learn_after_runs
                )
            )
            if learned is None:
                memory, memory_source = self.defaults.memory_mb, SOURCE_POLICY_DEFAULT
            else:
                memory, memory_source, memory_basis = learned.mb, learned.source, learned.basis
        operator_class = facts.operator.rpartition(".")[2] if facts.operator else None
        return Subject(facts, duration, duration_source, memory, memory_source, operator_class, memory_basis)

    def _decision(
        self, subject: Subject, passed_over: list[str], rule: Rule | None = None, executor: str = ""
    ) -> Decision:
        # Only the winner's reasons are written out: losing rules cost a failed compare, nothing more.
        reasons = [self._figures_reason(subject), *passed_over]
        if rule is None:
            # set, known and without limits whenever this is reached: see _check_every_task_has_a_home
            executor = cast(str, self.defaults.run_on)
            reasons.append(f"no rule took the task; {DEFAULTS_RULE_NAME} sends it to {executor}")
            return Decision(
                executor,
                (),
                (),
                DEFAULTS_RULE_NAME,
                -1,
                tuple(reasons),
                *_figures(subject),
                memory_basis=subject.memory_basis,
            )
        if rule.is_catch_all:
            reasons.append(f"rule {rule.name!r} takes every task")
        else:
            reasons.extend(condition.describe(subject, rule.name) for condition in rule.conditions)
        for smaller in rule.run_on[: rule.run_on.index(executor)]:
            reasons.append(f"rule {rule.name!r} passes over {smaller}: {self._breaches(smaller, subject)}")
        reasons.append(f"rule {rule.name!r} sends the task to {executor}")
        overflow = self._fitting("overflow", rule.overflow, executor, subject, reasons)
        fallback = self._fitting("fallback", rule.fallback, executor, subject, reasons)
        by_reason = tuple(
            (reason, self._fitting(f"fallback.{reason}", names, executor, subject, reasons))
            for reason, names in rule.fallback_by_reason
        )
        return Decision(
            executor,
            overflow,
            fallback,
            rule.name,
            rule.index,
            tuple(reasons),
            *_figures(subject),
            fallback_by_reason=by_reason,
            memory_basis=subject.memory_basis,
        )

    def _figures_reason(self, subject: Subject) -> str:
        duration = f"expected duration {format_duration(subject.duration_s)} from {subject.duration_source}"
        if subject.memory_basis is not None:
            return f"{duration}, memory {subject.memory_basis}"
        memory = f"{duration}, memory {subject.memory_mb} MB from {subject.memory_source}"
        evidence = subject.facts.memory_evidence
        if subject.memory_source == SOURCE_POLICY_DEFAULT and evidence is not None and evidence.runs:
            memory += (
                f" ({count_runs(evidence.runs, 'measured run')}, fewer than "
                f"settings.learn_after_runs {self.learn_after_runs})"
            )
        return memory

    def _fitting(
        self, role: str, executors: tuple[str, ...], chosen: str, subject: Subject, reasons: list[str]
    ) -> tuple[str, ...]:
        """``executors`` that can take the task, less ``chosen`` (a later entry of run_on may be listed)."""
        kept = []
        for name in executors:
            if name == chosen:
                continue
            breaches = self._breaches(name, subject)
            if breaches:
                reasons.append(f"{role} {name!r} dropped: {breaches}")
            else:
                kept.append(name)
        return tuple(kept)


def _figures(subject: Subject) -> tuple[float, str, int, str]:
    return subject.duration_s, subject.duration_source, subject.memory_mb, subject.memory_source


def _check_every_task_has_a_home(
    executors: Mapping[str, ExecutorSpec], defaults: Defaults, rules: Sequence[Rule]
) -> None:
    """Refuse a policy that could leave a task with no executor able to take it (the loader reports the
    same problems as issues with positions; this guards Policy objects built by hand)."""
    for rule in rules:
        unknown = {*rule.run_on, *rule.overflow, *rule.fallback_executors} - executors.keys()
        if unknown:
            raise ValueError(f"rule {rule.name!r} names unknown executors: {', '.join(sorted(unknown))}")
    if defaults.run_on is not None:
        spec = executors.get(defaults.run_on)
        if spec is None or not spec.limits.is_unlimited:
            raise ValueError(f"defaults.run_on {defaults.run_on!r} must name an executor without limits")
    elif not any(rule.is_catch_all and _takes_every_task(executors, rule) for rule in rules):
        raise ValueError(
            "defaults.run_on is required unless a rule without conditions uses an unlimited executor"
        )


def _takes_every_task(executors: Mapping[str, ExecutorSpec], rule: Rule) -> bool:
    """Whether one of the rule's run_on executors has no limits, so that no task skips the rule."""
    return any(executors[name].limits.is_unlimited for name in rule.run_on)

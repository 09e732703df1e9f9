"""The typed, frozen values a policy is made of, and what a decision says."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .units import format_duration, is_plain_number

if TYPE_CHECKING:
    from .facts import MemoryEvidence

FallbackMode = Literal["same_try", "next_try"]
FALLBACK_MODES: tuple[str, ...] = ("same_try", "next_try")

# Where the expected duration / memory need of a task came from (Decision.duration_source, memory_source).
SOURCE_EXECUTOR_CONFIG = "executor_config"
SOURCE_EXECUTION_TIMEOUT = "execution_timeout"
SOURCE_HISTORY = "history"
SOURCE_POLICY_DEFAULT = "policy_default"
SOURCE_TASK_FACTS = "task_facts"  # a TaskFacts built by hand without saying where its figure came from
SOURCE_MEASURED = "measured"  # the p95 of the task's measured peaks times settings.memory_headroom
SOURCE_OUT_OF_MEMORY = "out_of_memory"  # the task ran out of memory on a function of a known size

# Why a run died, as children report it (``InfrastructureFailure.reason``): the infrastructure outcomes of the
# Lambda protocol, then the two kinds of invoke Lambda refused. Kept here, not imported, because the policy
# engine knows no executor; a test holds the two in step.
FAILURE_REASONS: tuple[str, ...] = (
    "timeout",
    "out_of_memory",
    "runtime_crash",
    "dead_lettered",
    "throttled",
    "event_expired",
    "unreported",
    "credentials",
    "invoke_rejected",
)
# A fallback map may name several reasons at once: the run never began, so any executor can take the try.
REASON_GROUPS: Mapping[str, frozenset[str]] = {
    "never_started": frozenset({"throttled", "event_expired", "credentials", "invoke_rejected"}),
}
DEFAULT_REASON = "default"
FALLBACK_KEYS: tuple[str, ...] = (*FAILURE_REASONS, *REASON_GROUPS, DEFAULT_REASON)
_GROUP_OF = {reason: group for group, reasons in REASON_GROUPS.items() for reason in reasons}

FallbackByReason = tuple[tuple[str, tuple[str, ...]], ...]  # (reason or group, executors), in file order


def fallback_for_reason(lists: Mapping[str, Sequence[str]], reason: str) -> tuple[str, ...]:
    """The fallback list for a run that died of ``reason``: its own list, else its group's, else ``default``.

    A reason none of them covers has no fallback: the try fails as reported.
    """
    for key in (reason, _GROUP_OF.get(reason), DEFAULT_REASON):
        if key is not None and key in lists:
            return tuple(lists[key])
    return ()


@dataclass(frozen=True)
class Limits:
    """What a task may need at most to run on an executor; None means no limit."""

    max_duration_s: float | None = None
    max_memory_mb: int | None = None

    @property
    def is_unlimited(self) -> bool:
        return self.max_duration_s is None and self.max_memory_mb is None

    def breaches(self, executor: str, duration_s: float, memory_mb: int) -> list[str]:
        """Sentences for each limit the task exceeds, e.g. "expected 40m exceeds lambda's max_duration 15m"."""
        found = []
        if self.max_duration_s is not None and duration_s > self.max_duration_s:
            expected, limit = format_duration(duration_s), format_duration(self.max_duration_s)
            if expected == limit:  # over by less than the short form shows
                expected = f"{duration_s:g}s"
            found.append(f"expected {expected} exceeds {executor}'s max_duration {limit}")
        if self.max_memory_mb is not None and memory_mb > self.max_memory_mb:
            found.append(f"memory {memory_mb} MB exceeds {executor}'s max_memory_mb {self.max_memory_mb}")
        return found

    def bounds(self) -> tuple[float, float]:
        """(max duration, max memory) with math.inf for no limit: the form the decision loop compares with."""
        return (
            math.inf if self.max_duration_s is None else self.max_duration_s,
            math.inf if self.max_memory_mb is None else float(self.max_memory_mb),
        )


@dataclass(frozen=True)
class ExecutorSpec:
    """One executor the router builds and owns."""

    name: str
    class_path: str  # import path, or the short name of one of Airflow's core executors
    max_concurrency: int | None = None
    # Tasks the router may hand this executor beyond max_concurrency, to wait in its own queue (None: the
    # router's default for the class; docs/tuning.md).
    prefetch: int | None = None
    limits: Limits = field(default_factory=Limits)
    # Not in the repr: option values can be secrets (hybrid_router.redaction).
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=True, repr=False)


@dataclass(frozen=True)
class Defaults:
    expected_duration_s: float
    memory_mb: int
    # None only when a rule without conditions sends every task to an executor without limits
    run_on: str | None


@dataclass(frozen=True, slots=True)
class TaskFacts:
    """What the policy may look at for one task. Hashable: decisions are cached per TaskFacts."""

    dag_id: str
    task_id: str
    queue: str | None = None
    pool: str | None = None
    operator: str | None = None  # class name or full import path
    expected_duration_s: float | None = None
    duration_source: str | None = None
    memory_mb: int | None = None
    memory_source: str | None = None
    # What measured runs say about the memory need; the policy turns it into a figure when memory_mb is None
    memory_evidence: MemoryEvidence | None = None

    def __post_init__(self) -> None:
        # decisions compare these with limits: a NaN or a negative figure would slip past every check
        duration, memory = self.expected_duration_s, self.memory_mb
        if duration is not None and not (is_plain_number(duration) and duration >= 0):
            raise ValueError(f"TaskFacts.expected_duration_s must be a finite number >= 0, got {duration!r}")
        if memory is not None and not (is_plain_number(memory) and memory > 0):
            raise ValueError(f"TaskFacts.memory_mb must be a finite number > 0, got {memory!r}")


@dataclass(frozen=True)
class Decision:
    """Where a task runs, where it may spill to, where it is re-run after an infrastructure failure, and why."""

    executor: str
    overflow: tuple[str, ...]
    fallback: tuple[str, ...]
    rule: str
    rule_index: int  # index into Policy.rules; -1 when no rule took the task and defaults.run_on did
    reasons: tuple[str, ...]
    expected_duration_s: float
    duration_source: str
    memory_mb: int
    memory_source: str
    # Lists for particular failure reasons; ``fallback`` serves every reason not named here.
    fallback_by_reason: FallbackByReason = ()
    # Where a measured memory figure came from, as people read it ("1,824 MB: p95 of 14 runs x 1.2")
    memory_basis: str | None = None

    def fallback_lists(self) -> dict[str, tuple[str, ...]]:
        """Every fallback list by reason, ``default`` included: what ``decide_fallback`` picks from."""
        return {**dict(self.fallback_by_reason), DEFAULT_REASON: self.fallback}

    def fallback_for(self, reason: str) -> tuple[str, ...]:
        return fallback_for_reason(self.fallback_lists(), reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "executor": self.executor,
            "rule": self.rule,
            "rule_index": self.rule_index,
            "overflow": list(self.overflow),
            "fallback": list(self.fallback),
            "fallback_by_reason": {reason: list(names) for reason, names in self.fallback_by_reason},
            "reasons": list(self.reasons),
            "expected_duration_s": self.expected_duration_s,
            "duration_source": self.duration_source,
            "memory_mb": self.memory_mb,
            "memory_source": self.memory_source,
            "memory_basis": self.memory_basis,
        }

"""Rule conditions, compiled once when the policy loads so that a decision only compares and matches."""

from __future__ import annotations

import fnmatch
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .model import TaskFacts
from .units import format_duration


class Subject(NamedTuple):
    """A task as conditions see it, worked out once per decision (a NamedTuple: cheap to build)."""

    facts: TaskFacts
    duration_s: float
    duration_source: str
    memory_mb: int
    memory_source: str
    operator_class: str | None  # last part of facts.operator's dotted path
    memory_basis: str | None = None  # how a measured memory figure came about, for people


class Condition:
    """One entry of a rule's ``if``: ``key`` is its name there."""

    __slots__ = ()
    key: str

    def matches(self, subject: Subject) -> bool:
        raise NotImplementedError

    def describe(self, subject: Subject, rule: str) -> str:
        """Why a task that matches, matches: a sentence for Decision.reasons."""
        raise NotImplementedError

    def describe_mismatch(self, subject: Subject) -> str:
        """Why a task does not match, for Policy.explain."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class NamesCondition(Condition):
    """``queue`` / ``pool``: the task's value is one of the given names."""

    key: str
    names: frozenset[str]

    def matches(self, subject: Subject) -> bool:
        return getattr(subject.facts, self.key) in self.names

    def describe(self, subject: Subject, rule: str) -> str:
        return f"{self.key} {getattr(subject.facts, self.key)!r} matches rule {rule!r}"

    def describe_mismatch(self, subject: Subject) -> str:
        return f"{self.key} {_shown(getattr(subject.facts, self.key))} is not {_alternatives(self.names)}"


@dataclass(frozen=True, slots=True)
class OperatorCondition(Condition):
    """``operator``: a class name matches that class from any module; an import path matches that class.

    Airflow records only the class name of a task's operator (``TaskInstance.operator``), so an import path
    in a rule also matches facts that carry the bare class name: nothing more precise is known then.
    """

    key: str
    full_paths: frozenset[str]
    class_names: frozenset[str]
    classes_of_full_paths: frozenset[str]

    @classmethod
    def from_names(cls, names: Sequence[str]) -> OperatorCondition:
        full_paths = frozenset(name for name in names if "." in name)
        return cls(
            "operator",
            full_paths,
            frozenset(name for name in names if "." not in name),
            frozenset(path.rpartition(".")[2] for path in full_paths),
        )

    def matches(self, subject: Subject) -> bool:
        operator = subject.facts.operator
        return (
            subject.operator_class in self.class_names
            or operator in self.full_paths
            or operator in self.classes_of_full_paths  # a bare class name (a dotted path is never in it)
        )

    def describe(self, subject: Subject, rule: str) -> str:
        return f"operator {subject.facts.operator!r} matches rule {rule!r}"

    def describe_mismatch(self, subject: Subject) -> str:
        names = self.class_names | self.full_paths
        return f"operator {_shown(subject.facts.operator)} is not {_alternatives(names)}"


@dataclass(frozen=True, slots=True)
class GlobCondition(Condition):
    """``dag_id`` / ``task_id``: the id matches one of the globs (case-sensitive, like fnmatchcase)."""

    key: str
    globs: tuple[str, ...]
    pattern: re.Pattern[str]

    @classmethod
    def from_globs(cls, key: str, globs: Sequence[str]) -> GlobCondition:
        # one regex for all alternatives: one C call per decision however many globs there are
        combined = "|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs)
        return cls(key, tuple(globs), re.compile(combined))

    def matches(self, subject: Subject) -> bool:
        value = getattr(subject.facts, self.key)
        return value is not None and self.pattern.match(value) is not None

    def describe(self, subject: Subject, rule: str) -> str:
        value = getattr(subject.facts, self.key)
        glob = next((glob for glob in self.globs if fnmatch.fnmatchcase(value, glob)), self.globs[0])
        return f"{self.key} {value!r} matches {glob!r} of rule {rule!r}"

    def describe_mismatch(self, subject: Subject) -> str:
        value = getattr(subject.facts, self.key)
        return f"{self.key} {_shown(value)} matches none of {_alternatives(self.globs)}"


_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
}
_COMPARISON = re.compile(r"\s*(<=|>=|==|<|>)\s*(\S.*?)\s*", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Comparison:
    symbol: str
    bound: float
    text: str  # the bound as written, for messages
    test: Callable[[float, float], bool]


def parse_comparison(text: str, parse_bound: Callable[[str], float]) -> Comparison:
    """``"< 12m"`` -> Comparison; ``parse_bound`` reads the right-hand side (a duration or a size)."""
    match = _COMPARISON.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid comparison {text!r}: expected an operator (<, <=, >, >=, ==) and a value, like '< 12m'"
        )
    symbol, bound_text = match.groups()
    try:
        bound = parse_bound(bound_text)
    except ValueError as error:
        raise ValueError(f"invalid comparison {text!r}: {error}") from None
    return Comparison(symbol, float(bound), bound_text, _OPERATORS[symbol])


@dataclass(frozen=True, slots=True)
class ComparisonCondition(Condition):
    """``expected_duration`` / ``memory_mb``: every comparison holds for the task's figure."""

    key: str
    comparisons: tuple[Comparison, ...]

    def matches(self, subject: Subject) -> bool:
        value = subject.duration_s if self.key == "expected_duration" else subject.memory_mb
        for comparison in self.comparisons:
            if not comparison.test(value, comparison.bound):
                return False
        return True

    def describe(self, subject: Subject, rule: str) -> str:
        tests = " and ".join(f"{c.symbol} {self._show(c.bound)}" for c in self.comparisons)
        return f"{self._describe_figure(subject)} {tests}, as rule {rule!r} requires"

    def describe_mismatch(self, subject: Subject) -> str:
        failed = next(c for c in self.comparisons if not c.test(self._figure(subject), c.bound))
        return f"{self._describe_figure(subject)} is not {failed.symbol} {self._show(failed.bound)}"

    def _figure(self, subject: Subject) -> float:
        return subject.duration_s if self.key == "expected_duration" else subject.memory_mb

    def _describe_figure(self, subject: Subject) -> str:
        if self.key == "expected_duration":
            return f"expected duration {format_duration(subject.duration_s)} from {subject.duration_source}"
        return f"memory {subject.memory_mb} MB from {subject.memory_source}"

    def _show(self, bound: float) -> str:
        return format_duration(bound) if self.key == "expected_duration" else f"{bound:g} MB"

    def can_match(self) -> bool:
        """False when the comparisons exclude each other ('>= 10m' and '< 5m') or every possible figure."""
        # (bound, strict) for the lowest and highest figure admitted; figures start at 0 s and at 1 MB
        low, low_strict = (0.0 if self.key == "expected_duration" else 1.0), False
        high, high_strict = math.inf, False
        for comparison in self.comparisons:
            bound, symbol = comparison.bound, comparison.symbol
            strict = symbol in ("<", ">")
            if symbol in (">", ">=", "==") and (bound > low or (bound == low and strict)):
                low, low_strict = bound, strict
            if symbol in ("<", "<=", "==") and (bound < high or (bound == high and strict)):
                high, high_strict = bound, strict
        return low < high or (low == high and not low_strict and not high_strict)

    def admits_above(self, limit: float) -> bool:
        """Whether a figure above ``limit`` can pass: '< 20m' or '>= 1m' can, '< 15m' or '<= 15m' cannot."""
        upper = min((c.bound for c in self.comparisons if c.symbol in ("<", "<=", "==")), default=math.inf)
        return upper > limit


def _shown(value: str | None) -> str:
    return "(not set)" if value is None else repr(value)


def _alternatives(values: frozenset[str] | tuple[str, ...]) -> str:
    ordered = sorted(values) if isinstance(values, frozenset) else list(values)
    return " or ".join(repr(value) for value in ordered)

"""Policy files to Policy objects: YAML with positions, the JSON Schema, then the checks a schema cannot make.

Every problem becomes a PolicyIssue naming file, line, column and field; all of them are collected before
PolicyError is raised, so one run of ``validate`` shows everything that needs fixing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema

from hybrid_router.policies import SCHEMA

from .conditions import (
    ComparisonCondition,
    Condition,
    GlobCondition,
    NamesCondition,
    OperatorCondition,
    parse_comparison,
)
from .engine import DEFAULT_LEARN_AFTER_RUNS, DEFAULT_MEMORY_HEADROOM, Policy, Rule
from .errors import PolicyError, PolicyIssue, did_you_mean, in_file_order
from .model import (
    DEFAULT_REASON,
    FAILURE_REASONS,
    FALLBACK_KEYS,
    REASON_GROUPS,
    Defaults,
    ExecutorSpec,
    FallbackByReason,
    Limits,
)
from .prices import check_pricing
from .source import ROOT_PATH_NAME, FieldPath, SourceMap, YamlDocument, load_yaml
from .units import format_duration, is_plain_number, parse_duration, parse_memory_mb

log = logging.getLogger(__name__)

BUILTIN_EXPECTED_DURATION_S = 300.0
BUILTIN_MEMORY_MB = 512
BUILTIN_FALLBACK_MODE = "same_try"
BUILTIN_MAX_FALLBACKS = 2
# The short names Airflow resolves itself (airflow.executors.executor_constants.CORE_EXECUTOR_NAMES, minus
# its test-only MockExecutor); kept here because the policy engine does not import Airflow.
AIRFLOW_SHORT_EXECUTOR_NAMES = frozenset({"LocalExecutor", "CeleryExecutor", "KubernetesExecutor"})

# cheapest first: the order only changes how soon a losing rule is abandoned, never the outcome
_CONDITION_COST = {"queue": 0, "pool": 0, "operator": 1, "expected_duration": 2, "memory_mb": 2}
_GLOB_KEYS = ("dag_id", "task_id")
# The limit a fallback must exceed to help after a run died of that reason: (Limits field, its policy key, shown)
_LIMIT_OF_REASON: dict[str, tuple[str, str, Callable[[float], str]]] = {
    "timeout": ("max_duration_s", "max_duration", format_duration),
    "out_of_memory": ("max_memory_mb", "max_memory_mb", lambda mb: f"{mb:g} MB"),
}
_EXECUTOR_NAME_RULE = "use letters, digits, '_' and '-', starting with a letter or '_'"
_CLASS_RULE = (
    "expected an import path like 'package.module.ExecutorClass' or a short name like 'LocalExecutor'"
)
_JSON_TYPES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and check a policy file; raises PolicyError (also for a file that cannot be read)."""
    filename = os.fspath(path)
    try:
        raw = Path(filename).read_bytes()
    except OSError as error:
        reason = error.strerror or str(error)
        raise PolicyError(
            [PolicyIssue(filename, 1, 1, ROOT_PATH_NAME, f"cannot read the file: {reason}")]
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise PolicyError(
            [PolicyIssue(filename, line, column, ROOT_PATH_NAME, f"not UTF-8 text: {error.reason}")]
        ) from None
    return load_policy_text(text, filename)


def load_policy_text(text: str, filename: str = "<string>") -> Policy:
    """Check a policy given as text; ``filename`` is what issues and ``Policy.source`` call it."""
    document = load_yaml(text, filename)
    builder = _PolicyBuilder(document)
    try:
        return builder.build(document.value)
    except PolicyError:
        raise
    except Exception as error:
        # A bug of ours must still reach a validator as an issue, not as a traceback in the scheduler.
        log.exception("Unexpected failure while checking policy %s", filename)
        raise PolicyError(
            [
                *builder.all_errors(),
                document.source.issue((), f"internal error while checking the policy: {error!r}"),
            ],
            builder.warnings,
        ) from error


@functools.cache
def _schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


class _PolicyBuilder:
    def __init__(self, document: YamlDocument):
        self.source: SourceMap = document.source
        self._yaml_issues = document.issues
        self.errors: list[PolicyIssue] = []
        self.warnings: list[PolicyIssue] = []
        self._flagged: set[FieldPath] = set(document.rejected)  # fields already reported: not judged again
        self._unknown_keys: list[FieldPath] = []

    def all_errors(self) -> list[PolicyIssue]:
        """Errors found so far; YAML problems inside a key that should not be there at all are noise."""
        unknown = self._unknown_keys
        return [
            issue for path, issue in self._yaml_issues if not any(path[: len(key)] == key for key in unknown)
        ] + self.errors

    # -- reporting --------------------------------------------------------------------------------------
    def error(self, path: FieldPath, message: str, *, at_key: bool = False) -> None:
        self.errors.append(self.source.issue(path, message, at_key=at_key))
        self._flagged.add(path)

    def warn(self, path: FieldPath, message: str) -> None:
        self.warnings.append(self.source.issue(path, message, severity="warning"))

    def _usable(self, path: FieldPath) -> bool:
        return not any(path[:length] in self._flagged for length in range(len(path) + 1))

    def _parsed(self, path: FieldPath, value: Any, parse: Callable[[Any], Any]) -> Any | None:
        """``parse(value)``, or None after reporting its ValueError at ``path``."""
        if value is None or not self._usable(path):
            return None
        try:
            return parse(value)
        except ValueError as error:
            self.error(path, str(error))
            return None

    # -- the whole file ---------------------------------------------------------------------------------
    def build(self, data: Any) -> Policy:
        if isinstance(data, dict) and data and not data.keys() & _schema_validator().schema["properties"]:
            # some other YAML file: listing every key as unknown would bury the one thing worth saying
            raise PolicyError(
                [
                    self.source.issue(
                        (),
                        "not a routing policy: none of its top-level keys is version, executors, defaults, "
                        f"settings or rules (found {', '.join(sorted(data)[:5])})",
                    )
                ]
            )
        self._check_schema(data)
        if not isinstance(data, dict):
            raise PolicyError(self.all_errors(), self.warnings)
        executors = self._executors(data.get("executors"))
        rules = self._rules(data.get("rules"), executors)
        defaults = self._defaults(_mapping(data.get("defaults")), executors, rules)
        settings = _mapping(data.get("settings"))
        self._check_unused(executors, rules, defaults)
        headroom = self._finite_setting(settings, "memory_headroom")
        pricing = check_pricing(
            _mapping(data.get("pricing")), ("pricing",), self.error, self._usable, executors
        )
        errors = self.all_errors()
        if errors:
            raise PolicyError(errors, self.warnings)
        return Policy(
            source=self.source.filename,
            version=int(data["version"]),
            executors=executors,
            defaults=defaults,
            rules=rules,
            warnings=sorted(self.warnings, key=in_file_order),
            fallback_mode=settings.get("fallback_mode", BUILTIN_FALLBACK_MODE),
            max_fallbacks=int(settings.get("max_fallbacks", BUILTIN_MAX_FALLBACKS)),
            memory_headroom=DEFAULT_MEMORY_HEADROOM if headroom is None else headroom,
            learn_after_runs=int(settings.get("learn_after_runs", DEFAULT_LEARN_AFTER_RUNS)),
            pricing=pricing,
        )

    def _finite_setting(self, settings: dict[str, Any], key: str) -> float | None:
        # the schema's minimum and maximum let NaN through: every comparison with it is false
        value = settings.get(key)
        path: FieldPath = ("settings", key)
        if value is None or not self._usable(path):
            return None
        if not is_plain_number(value):
            self.error(path, f"must be a finite number, got {_describe(value)}")
            return None
        return float(value)

    # -- structure --------------------------------------------------------------------------------------
    def _check_schema(self, data: Any) -> None:
        seen: set[tuple[FieldPath, str]] = set()
        for error in _schema_validator().iter_errors(data):
            for path, message, at_key in explain_schema_error(error):
                if (path, message) not in seen and self._usable(path):
                    seen.add((path, message))
                    self.error(path, message, at_key=at_key)
                    if error.validator == "additionalProperties":
                        self._unknown_keys.append(path)

    # -- executors --------------------------------------------------------------------------------------
    def _executors(self, raw: Any) -> dict[str, ExecutorSpec]:
        executors: dict[str, ExecutorSpec] = {}
        for name, spec in _mapping(raw).items():
            path: FieldPath = ("executors", name)
            spec = _mapping(spec)
            class_path = spec.get("class")
            if isinstance(class_path, str) and self._usable((*path, "class")) and "." not in class_path:
                if class_path not in AIRFLOW_SHORT_EXECUTOR_NAMES:
                    self.error(
                        (*path, "class"),
                        f"unknown executor {class_path!r}{did_you_mean(class_path, AIRFLOW_SHORT_EXECUTOR_NAMES)};"
                        " give an import path such as 'airflow.providers.amazon.aws.executors.ecs.ecs_executor."
                        "AwsEcsExecutor', or one of " + ", ".join(sorted(AIRFLOW_SHORT_EXECUTOR_NAMES)),
                    )
            concurrency = spec.get("max_concurrency")
            prefetch = spec.get("prefetch")
            executors[name] = ExecutorSpec(
                name=name,
                class_path=class_path if isinstance(class_path, str) else "",
                max_concurrency=int(concurrency) if is_plain_number(concurrency) else None,
                prefetch=int(prefetch) if is_plain_number(prefetch) else None,
                limits=self._limits((*path, "limits"), _mapping(spec.get("limits"))),
                options=_mapping(spec.get("options")),
            )
        return executors

    def _limits(self, path: FieldPath, raw: dict[str, Any]) -> Limits:
        max_duration = self._parsed((*path, "max_duration"), raw.get("max_duration"), _positive_duration)
        if "max_memory" in raw and "max_memory_mb" in raw:
            self.error((*path, "max_memory"), "give max_memory or max_memory_mb, not both", at_key=True)
        key = "max_memory" if "max_memory" in raw else "max_memory_mb"
        max_memory = self._parsed((*path, key), raw.get(key), parse_memory_mb)
        return Limits(max_duration_s=max_duration, max_memory_mb=max_memory)

    # -- rules ------------------------------------------------------------------------------------------
    def _rules(self, raw: Any, executors: dict[str, ExecutorSpec]) -> list[Rule]:
        rules: list[Rule] = []
        first_by_name: dict[str, FieldPath] = {}
        shadowing: Rule | None = None  # first catch-all whose executor takes every task
        for index, item in enumerate(raw if isinstance(raw, list) else []):
            path: FieldPath = ("rules", index)
            item = _mapping(item)
            name = item.get("name")
            name = name if isinstance(name, str) else f"rules[{index}]"
            if name in first_by_name and self._usable((*path, "name")):
                first = first_by_name[name]
                self.error(
                    (*path, "name"),
                    f"duplicate rule name {name!r} (first used by rules[{first[1]}] at line "
                    f"{self.source.value_at(first).line})",
                )
            first_by_name.setdefault(name, path)
            run_on = self._run_on((*path, "run_on"), item.get("run_on"), executors)
            overflow = self._executor_list((*path, "overflow"), item.get("overflow"), run_on, executors)
            fallback, by_reason = self._fallback(
                (*path, "fallback"), item.get("fallback"), run_on, overflow, executors
            )
            rule = Rule(
                index=index,
                name=name,
                conditions=self._conditions((*path, "if"), _mapping(item.get("if"))),
                run_on=run_on,
                overflow=overflow,
                fallback=fallback,
                line=self.source.value_at(path).line,
                fallback_by_reason=by_reason,
            )
            if shadowing is not None:
                self.error(
                    path,
                    f"can never match: shadowed by catch-all rule {shadowing.name!r} at line {shadowing.line}",
                )
            elif "if" not in item and any(
                name in executors and executors[name].limits.is_unlimited for name in run_on
            ):
                shadowing = rule
            if all(name in executors for name in run_on):
                self._check_rule_limits(path, rule, [executors[name] for name in run_on])
            rules.append(rule)
        return rules

    def _run_on(self, path: FieldPath, raw: Any, executors: dict[str, ExecutorSpec]) -> tuple[str, ...]:
        """The rule's executors, smallest first; an entry no task could ever be sent to is an error."""
        names = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        kept: list[tuple[str, FieldPath]] = []
        for position, name in enumerate(names):
            item_path = path if isinstance(raw, str) else (*path, position)
            if not isinstance(name, str) or not self._usable(item_path):
                continue
            if any(name == earlier for earlier, _ in kept):
                self.error(item_path, f"{name!r} is listed twice in run_on")
                continue
            self._check_reference(item_path, name, executors)
            kept.append((name, item_path))
        known = [(name, item_path) for name, item_path in kept if name in executors]
        for position, (name, item_path) in enumerate(known):
            bigger = next(
                (earlier for earlier, _ in known[:position] if _covers(executors[earlier], executors[name])),
                None,
            )
            if bigger is not None:
                self.error(
                    item_path,
                    f"can never be chosen: {bigger!r} before it takes every task {name!r} could take; "
                    "list run_on executors smallest first",
                )
        return tuple(name for name, _ in kept) or ("",)

    def _fallback(
        self,
        path: FieldPath,
        raw: Any,
        run_on: tuple[str, ...],
        overflow: tuple[str, ...],
        executors: dict[str, ExecutorSpec],
    ) -> tuple[tuple[str, ...], FallbackByReason]:
        """(the list for any reason, the lists for named reasons) of a plain list or a map by reason."""
        if not isinstance(raw, dict) or not self._usable(path):
            return self._executor_list(path, raw, run_on, executors), ()
        default: tuple[str, ...] = ()
        by_reason: list[tuple[str, tuple[str, ...]]] = []
        for reason, names in raw.items():
            reason_path = (*path, reason)
            if reason not in FALLBACK_KEYS or not self._usable(reason_path):
                continue  # the schema has said what is wrong with it
            kept = self._executor_list(reason_path, names, run_on, executors, f"fallback.{reason}")
            if reason == DEFAULT_REASON:
                default = kept
                continue
            by_reason.append((reason, kept))
            if reason in _LIMIT_OF_REASON:
                self._check_fallback_helps(reason_path, names, reason, kept, (*run_on, *overflow), executors)
        if DEFAULT_REASON not in raw:
            covered = {reason for key in raw for reason in REASON_GROUPS.get(key, {key})}
            uncovered = [reason for reason in FAILURE_REASONS if reason not in covered]
            if uncovered:
                self.warn(
                    path,
                    f"no {DEFAULT_REASON!r} list: a run that dies of {', '.join(uncovered)} is not re-run",
                )
        return default, tuple(by_reason)

    def _check_fallback_helps(
        self,
        path: FieldPath,
        raw: Any,
        reason: str,
        names: tuple[str, ...],
        rule_executors: tuple[str, ...],
        executors: dict[str, ExecutorSpec],
    ) -> None:
        """A fallback whose limit is no larger than that of every executor the task can die of ``reason`` on
        would die the same way. Executors without that limit are taken not to die of it."""
        attribute, limit_name, show = _LIMIT_OF_REASON[reason]
        limited = [
            (limit, name)
            for name in rule_executors
            if name in executors and (limit := getattr(executors[name].limits, attribute)) is not None
        ]
        if not limited:
            return
        least, least_name = min(limited)
        for name in names:
            limit = getattr(executors[name].limits, attribute)
            if limit is None or limit > least:
                continue
            item_path = path if isinstance(raw, str) else (*path, raw.index(name))
            self.error(
                item_path,
                f"{name!r} cannot help after {reason}: its {limit_name} {show(limit)} is no more than "
                f"{least_name}'s {show(least)}, so a run that died there would die the same way",
            )

    def _conditions(self, path: FieldPath, raw: dict[str, Any]) -> tuple[Condition, ...]:
        conditions: list[Condition] = []
        for key, value in raw.items():
            field_path = (*path, key)
            if not self._usable(field_path):
                continue
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                continue  # the schema has said what is wrong with it
            if key in ("queue", "pool"):
                conditions.append(NamesCondition(key, frozenset(items)))
            elif key == "operator":
                conditions.append(OperatorCondition.from_names(items))
            elif key in _GLOB_KEYS:
                conditions.append(GlobCondition.from_globs(key, items))
            elif key in ("expected_duration", "memory_mb"):
                condition = self._comparisons(field_path, key, value, items)
                if condition is not None:
                    conditions.append(condition)
        conditions.sort(key=lambda condition: _CONDITION_COST.get(condition.key, 3))
        return tuple(conditions)

    def _comparisons(
        self, path: FieldPath, key: str, value: Any, items: list[str]
    ) -> ComparisonCondition | None:
        parse_bound = parse_duration if key == "expected_duration" else parse_memory_mb
        comparisons = []
        for position, text in enumerate(items):
            item_path = path if isinstance(value, str) else (*path, position)
            comparison = self._parsed(item_path, text, lambda text: parse_comparison(text, parse_bound))
            if comparison is None:
                return None
            comparisons.append(comparison)
        condition = ComparisonCondition(key, tuple(comparisons))
        if not condition.can_match():
            written = " and ".join(repr(text) for text in items)
            figure = "expected duration" if key == "expected_duration" else "memory size"
            self.error(path, f"can never match: no {figure} satisfies {written}")
            return None
        return condition

    def _executor_list(
        self,
        path: FieldPath,
        raw: Any,
        run_on: tuple[str, ...],
        executors: dict[str, ExecutorSpec],
        role: str | None = None,
    ) -> tuple[str, ...]:
        if raw is None or not self._usable(path) or not isinstance(raw, (str, list)):
            return ()
        names = [raw] if isinstance(raw, str) else raw
        role = role or str(path[-1])
        which = "this rule's run_on" if len(run_on) == 1 else "first in this rule's run_on"
        kept: list[str] = []
        for position, name in enumerate(names):
            item_path = path if isinstance(raw, str) else (*path, position)
            if not isinstance(name, str) or not self._check_reference(item_path, name, executors):
                continue
            # later entries of a run_on list may be named: a task that fits the first can still spill or
            # fall back to them
            if name == run_on[0]:
                self.error(item_path, f"{name!r} is {which}; {role} must name other executors")
            elif name in kept:
                self.error(item_path, f"{name!r} is listed twice in {role}")
            else:
                kept.append(name)
        return tuple(kept)

    def _check_reference(self, path: FieldPath, name: str, executors: dict[str, ExecutorSpec]) -> bool:
        """Whether ``name`` is a defined executor; reports it when not (unless already reported)."""
        if name in executors:
            return True
        # when the executors section itself is broken, every reference would look unknown: that is noise
        if self._usable(path) and self._usable(("executors",)) and name:
            self.error(path, f"unknown executor {name!r}{did_you_mean(name, executors)}")
        return False

    def _check_rule_limits(self, path: FieldPath, rule: Rule, run_on: list[ExecutorSpec]) -> None:
        """Warn when a rule's conditions let through tasks none of its executors can take (they skip the
        rule); with several executors, the largest limit is the one that counts."""
        conditions = {condition.key: condition for condition in rule.conditions}
        checks = (
            ("expected_duration", "max_duration_s", "longer than", "max_duration", format_duration),
            ("memory_mb", "max_memory_mb", "bigger than", "max_memory_mb", str),
        )
        for key, attribute, comparative, limit_name, show in checks:
            limits = [(getattr(executor.limits, attribute), executor) for executor in run_on]
            if any(limit is None for limit, _ in limits):
                continue
            limit, executor = max(limits, key=lambda pair: pair[0])
            condition = conditions.get(key)
            if isinstance(condition, ComparisonCondition):
                if not condition.admits_above(limit):
                    continue
                because = f"its {key} condition allows more"
            else:
                because = f"it has no {key} condition"
            self.warn(
                (*path, "run_on"),
                f"rule {rule.name!r} admits tasks {comparative} {executor.name}'s {limit_name} {show(limit)} "
                f"({because}); such tasks skip this rule",
            )

    # -- defaults and the executor of last resort ----------------------------------------------------------
    def _defaults(
        self, raw: dict[str, Any], executors: dict[str, ExecutorSpec], rules: list[Rule]
    ) -> Defaults:
        path: FieldPath = ("defaults",)
        duration = self._parsed((*path, "expected_duration"), raw.get("expected_duration"), parse_duration)
        memory = self._parsed((*path, "memory_mb"), raw.get("memory_mb"), parse_memory_mb)
        run_on = raw.get("run_on")
        run_on = run_on if isinstance(run_on, str) else None
        # a catch-all on an unknown executor is reported already; asking for defaults.run_on too is noise
        takes_every_task = any(
            rule.is_catch_all
            and any(name not in executors or executors[name].limits.is_unlimited for name in rule.run_on)
            for rule in rules
        )
        if run_on is not None:
            if self._check_reference((*path, "run_on"), run_on, executors):
                limits = executors[run_on].limits
                if not limits.is_unlimited:
                    self.error(
                        (*path, "run_on"),
                        f"{run_on!r} has limits, so a task exceeding them would have nowhere to run; "
                        "name an executor without limits",
                    )
        elif not takes_every_task and "run_on" not in raw and rules and executors:
            self.error(
                (*path, "run_on"),
                "missing: no rule without 'if' sends every task to an executor without limits, so tasks that "
                "no rule takes need a defaults.run_on",
            )
        return Defaults(
            expected_duration_s=BUILTIN_EXPECTED_DURATION_S if duration is None else duration,
            memory_mb=BUILTIN_MEMORY_MB if memory is None else memory,
            run_on=run_on,
        )

    def _check_unused(
        self, executors: dict[str, ExecutorSpec], rules: list[Rule], defaults: Defaults
    ) -> None:
        used = {defaults.run_on}
        for rule in rules:
            used.update((*rule.run_on, *rule.overflow, *rule.fallback_executors))
        for name in executors:
            if name not in used:
                self.warn(
                    ("executors", name), f"executor {name!r} is not used by any rule or defaults.run_on"
                )


def _covers(earlier: ExecutorSpec, later: ExecutorSpec) -> bool:
    """Whether every task that fits ``later`` fits ``earlier`` too."""
    (earlier_duration, earlier_memory), (later_duration, later_memory) = (
        earlier.limits.bounds(),
        later.limits.bounds(),
    )
    return earlier_duration >= later_duration and earlier_memory >= later_memory


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"invalid duration {value!r}: must be greater than 0")
    return seconds


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    kind = {str: "string", int: "integer", float: "number"}.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} {shown if len(shown) <= 40 else shown[:37] + '...'}"


class _SchemaProblem(NamedTuple):
    path: FieldPath
    message: str
    at_key: bool = False  # point at the key (an unknown or badly named one), not at its value


def explain_schema_error(error: jsonschema.ValidationError) -> list[_SchemaProblem]:
    """The problems one jsonschema error stands for, in our words."""
    path: FieldPath = tuple(error.absolute_path)
    validator, expected, instance = error.validator, error.validator_value, error.instance
    if "propertyNames" in error.schema_path and validator == "enum":  # the reasons of a fallback map
        hint = did_you_mean(instance, FALLBACK_KEYS) if isinstance(instance, str) else ""
        return [
            _SchemaProblem(
                (*path, instance),
                f"unknown failure reason {instance!r}{hint}; use {', '.join(FALLBACK_KEYS)}",
                at_key=True,
            )
        ]
    if "propertyNames" in error.schema_path:
        return [
            _SchemaProblem(
                (*path, instance), f"invalid executor name {instance!r}: {_EXECUTOR_NAME_RULE}", at_key=True
            )
        ]
    if validator == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties", {})
        return [
            _SchemaProblem((*path, key), f"unknown key {key!r}{did_you_mean(key, known)}", at_key=True)
            for key in instance
            if key not in known
        ]
    if validator == "required" and isinstance(instance, dict):
        return [
            _SchemaProblem((*path, key), f"missing required key {key!r}")
            for key in expected
            if key not in instance
        ]
    if validator == "type":
        kinds = [expected] if isinstance(expected, str) else list(expected)
        wanted = " or ".join(_JSON_TYPES.get(kind, kind) for kind in kinds)
        return [_SchemaProblem(path, f"expected {wanted}, got {_describe(instance)}")]
    if validator == "const" and path == ("version",):
        return [
            _SchemaProblem(path, f"unsupported version {instance!r}: this release reads version {expected}")
        ]
    if validator == "enum":
        choices = ", ".join(repr(choice) for choice in expected)
        hint = (
            did_you_mean(instance, [str(choice) for choice in expected]) if isinstance(instance, str) else ""
        )
        return [_SchemaProblem(path, f"{_describe(instance)} is not one of {choices}{hint}")]
    if validator in ("minItems", "minProperties", "minLength"):
        return [_SchemaProblem(path, "must not be empty")]
    if validator == "minimum":
        return [_SchemaProblem(path, f"must be at least {expected}, got {_describe(instance)}")]
    if validator == "maximum":
        return [_SchemaProblem(path, f"must be at most {expected}, got {_describe(instance)}")]
    if validator == "pattern" and path[-1:] == ("class",):
        return [_SchemaProblem(path, f"invalid class {instance!r}: {_CLASS_RULE}")]
    if validator == "pattern":  # the other pattern in the schema is the one for executor names
        return [_SchemaProblem(path, f"invalid executor name {instance!r}: {_EXECUTOR_NAME_RULE}")]
    return [_SchemaProblem(path, error.message)]

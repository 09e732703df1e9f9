"""Settings of the local Lambda service and of the functions it hosts, and their YAML file.

The YAML file (``--config``) looks like::

    log_dir: ./local-lambda-logs          # one folder per function, one file per log stream
    sqs_endpoint_url: http://127.0.0.1:5000
    account_concurrency: 16               # like the account's concurrency limit, shared by unreserved functions
    retry_delays_s: [1, 2]                # delays before async retries 1 and 2 (AWS: about 1 min, then 2 min)
    throttle_retry_s: [1, 300]            # an event that found its function at its concurrency limit is tried
                                          # again after 1 s, the wait doubling up to 300 s (AWS's); [0, 0]: at once
    functions:
      - name: airflow-task
        handler: hybrid_router.lambda_exec.handler.handler
        memory_mb: 1024
        timeout_s: 60
        reserved_concurrency: 4
        environment: {AIRFLOW__CORE__EXECUTION_API_SERVER_URL: "http://127.0.0.1:8080/execution/"}
        dead_letter_queue_url: http://127.0.0.1:5000/123456789012/airflow-dlq
        maximum_retry_attempts: 0
        maximum_event_age_s: 300

Errors name the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybrid_router.lambda_exec.local.faults import FaultConfigError, FaultSettings

DEFAULT_HANDLER = "hybrid_router.lambda_exec.handler.handler"
DEFAULT_RETRY_DELAYS_S = (1.0, 2.0)
# AWS: "For throttling errors (429) [...] Lambda returns the event to the queue [...]. The retry interval increases
# exponentially from 1 second after the first attempt to a maximum of 5 minutes." (Lambda developer guide, "How
# Lambda handles errors and retries with asynchronous invocation".)
DEFAULT_THROTTLE_RETRY_S = (1.0, 300.0)
DEFAULT_ACCOUNT_CONCURRENCY = 16
FUNCTION_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HANDLER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
MIN_MEMORY_MB, MAX_MEMORY_MB = 128, 10_240
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1, 900
# AWS accepts 60 s to 6 h; locally an age from 1 s is allowed so that expiry can be tested in seconds
# (the API's PutFunctionEventInvokeConfig still enforces AWS's range).
MIN_EVENT_AGE_S, MAX_EVENT_AGE_S = 1, 21_600
AWS_MIN_EVENT_AGE_S = 60


class ConfigError(ValueError):
    """A bad setting; the message names where it came from and the field."""

    def __init__(self, message: str, field_name: str = ""):
        super().__init__(message)
        self.field_name = field_name


@dataclass(frozen=True)
class FunctionConfig:
    """One Lambda function: what AWS keeps in the function configuration and its event-invoke config."""

    name: str
    handler: str = DEFAULT_HANDLER
    memory_mb: int = 1024
    timeout_s: float = 60
    reserved_concurrency: int | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    dead_letter_queue_url: str | None = None
    maximum_retry_attempts: int = 0
    maximum_event_age_s: int = 300
    code_path: str | None = None  # a folder put first on the sandbox's sys.path (the "deployment package")
    # Requests per second above which invokes (async too) answer 429; None: no rate limit (AWS's default
    # limit is far above anything a local test reaches).
    max_requests_per_s: float | None = None

    def __post_init__(self) -> None:
        check_function(self, where=f"function {self.name!r}")

    def replace(self, **changes: Any) -> FunctionConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["environment"] = dict(self.environment)
        return data


@dataclass(frozen=True)
class ServiceConfig:
    functions: tuple[FunctionConfig, ...] = ()
    log_dir: str = "local-lambda-logs"
    sqs_endpoint_url: str | None = None
    account_concurrency: int = DEFAULT_ACCOUNT_CONCURRENCY
    retry_delays_s: tuple[float, ...] = DEFAULT_RETRY_DELAYS_S
    # (first, most): the wait before an async event that found its function at its concurrency limit is tried
    # again, doubling from the first to the most; (0, 0) starts it as soon as a slot frees.
    throttle_retry_s: tuple[float, float] = DEFAULT_THROTTLE_RETRY_S
    region: str = "us-east-1"
    account_id: str = "123456789012"
    # A warm sandbox nobody used for this long is stopped, as Lambda reclaims idle execution environments.
    idle_sandbox_ttl_s: float = 300.0
    # AWS's latency and at-least-once delivery, on demand (faults.py); none by default.
    faults: FaultSettings = field(default_factory=FaultSettings)

    def __post_init__(self) -> None:
        if isinstance(self.faults, Mapping):
            try:
                object.__setattr__(self, "faults", FaultSettings.from_dict(self.faults))
            except FaultConfigError as exc:
                raise ConfigError(str(exc), "faults") from None
        if not _is_int(self.account_concurrency) or self.account_concurrency < 1:
            raise ConfigError(
                f"account_concurrency: expected a positive integer, got {self.account_concurrency!r}",
                "account_concurrency",
            )
        delays = self.retry_delays_s
        if (
            not isinstance(delays, tuple)
            or len(delays) < 2
            or not all(_is_number(d) and d >= 0 for d in delays)
        ):
            raise ConfigError(
                f"retry_delays_s: expected two non-negative numbers, got {delays!r}", "retry_delays_s"
            )
        throttle = self.throttle_retry_s
        if (
            not isinstance(throttle, tuple)
            or len(throttle) != 2
            or not all(_is_number(d) and d >= 0 for d in throttle)
            or throttle[0] > throttle[1]
        ):
            raise ConfigError(
                f"throttle_retry_s: expected [first, most] seconds, 0 <= first <= most, got {throttle!r}",
                "throttle_retry_s",
            )
        if not _is_number(self.idle_sandbox_ttl_s) or self.idle_sandbox_ttl_s <= 0:
            raise ConfigError(
                f"idle_sandbox_ttl_s: expected a positive number, got {self.idle_sandbox_ttl_s!r}",
                "idle_sandbox_ttl_s",
            )
        names = [f.name for f in self.functions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"functions: duplicate function names {duplicates}", "functions")

    def to_dict(self) -> dict[str, Any]:
        return {
            "functions": [f.to_dict() for f in self.functions],
            "log_dir": self.log_dir,
            "sqs_endpoint_url": self.sqs_endpoint_url,
            "account_concurrency": self.account_concurrency,
            "retry_delays_s": list(self.retry_delays_s),
            "throttle_retry_s": list(self.throttle_retry_s),
            "region": self.region,
            "account_id": self.account_id,
            "idle_sandbox_ttl_s": self.idle_sandbox_ttl_s,
            "faults": self.faults.to_dict(),
        }


def check_function(fn: FunctionConfig, where: str) -> None:
    """Check one function's settings against Lambda's own limits; raise ConfigError naming the field."""

    def bad(name: str, expected: str) -> ConfigError:
        return ConfigError(f"{where}: {name}: expected {expected}, got {getattr(fn, name)!r}", name)

    if not isinstance(fn.name, str) or not FUNCTION_NAME_RE.match(fn.name):
        raise bad("name", "1-64 letters, digits, '-' or '_'")
    if not isinstance(fn.handler, str) or not HANDLER_RE.match(fn.handler):
        raise bad("handler", "an import path 'module.function', e.g. " + DEFAULT_HANDLER)
    if not _is_int(fn.memory_mb) or not MIN_MEMORY_MB <= fn.memory_mb <= MAX_MEMORY_MB:
        raise bad("memory_mb", f"an integer from {MIN_MEMORY_MB} to {MAX_MEMORY_MB}")
    if not _is_number(fn.timeout_s) or not MIN_TIMEOUT_S <= fn.timeout_s <= MAX_TIMEOUT_S:
        raise bad("timeout_s", f"a number of seconds from {MIN_TIMEOUT_S} to {MAX_TIMEOUT_S}")
    if fn.reserved_concurrency is not None and (
        not _is_int(fn.reserved_concurrency) or fn.reserved_concurrency < 0
    ):
        raise bad("reserved_concurrency", "a non-negative integer or null")
    if not isinstance(fn.environment, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fn.environment.items()
    ):
        raise bad("environment", "a mapping of strings to strings")
    if fn.dead_letter_queue_url is not None and not isinstance(fn.dead_letter_queue_url, str):
        raise bad("dead_letter_queue_url", "an SQS queue URL or ARN, or null")
    if not _is_int(fn.maximum_retry_attempts) or not 0 <= fn.maximum_retry_attempts <= 2:
        raise bad("maximum_retry_attempts", "0, 1 or 2")
    if (
        not _is_int(fn.maximum_event_age_s)
        or not MIN_EVENT_AGE_S <= fn.maximum_event_age_s <= MAX_EVENT_AGE_S
    ):
        raise bad("maximum_event_age_s", f"an integer from {MIN_EVENT_AGE_S} to {MAX_EVENT_AGE_S}")
    if fn.code_path is not None and not isinstance(fn.code_path, str):
        raise bad("code_path", "a folder path or null")
    if fn.max_requests_per_s is not None and (
        not _is_number(fn.max_requests_per_s) or fn.max_requests_per_s <= 0
    ):
        raise bad("max_requests_per_s", "a positive number or null")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_FUNCTION_FIELDS = {f.name for f in dataclasses.fields(FunctionConfig)}
_SERVICE_FIELDS = {f.name for f in dataclasses.fields(ServiceConfig)} - {"functions"}


def load_config(path: str | Path) -> ServiceConfig:
    """Read the service's YAML file; every error names the file, the line and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if root is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping with 'functions'")
    return parse_config(root, str(path))


def _at(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _mapping(node: yaml.Node, source: str, what: str) -> dict[str, tuple[yaml.Node, Any]]:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_at(source, node)}: {what}: expected a mapping")
    items: dict[str, tuple[yaml.Node, Any]] = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key in items:
            raise ConfigError(f"{_at(source, key_node)}: {what}: duplicate key {key!r}")
        items[key] = (value_node, _construct(value_node))
    return items


def _construct(node: yaml.Node) -> Any:
    """The plain Python value of a composed node (the node keeps the line numbers)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_config(root: yaml.Node, source: str) -> ServiceConfig:
    top = _mapping(root, source, "top level")
    unknown = sorted(set(top) - _SERVICE_FIELDS - {"functions"})
    if unknown:
        node = top[unknown[0]][0]
        raise ConfigError(
            f"{_at(source, node)}: unknown setting {unknown[0]!r}; known: {sorted(_SERVICE_FIELDS | {'functions'})}"
        )
    functions: list[FunctionConfig] = []
    if "functions" in top:
        list_node = top["functions"][0]
        if not isinstance(list_node, yaml.SequenceNode):
            raise ConfigError(f"{_at(source, list_node)}: functions: expected a list")
        for index, fn_node in enumerate(list_node.value):
            fields = _mapping(fn_node, source, f"functions[{index}]")
            unknown = sorted(set(fields) - _FUNCTION_FIELDS)
            if unknown:
                raise ConfigError(
                    f"{_at(source, fields[unknown[0]][0])}: functions[{index}].{unknown[0]}: unknown field; "
                    f"known: {sorted(_FUNCTION_FIELDS)}"
                )
            if "name" not in fields:
                raise ConfigError(f"{_at(source, fn_node)}: functions[{index}].name: required")
            values = {key: value for key, (_, value) in fields.items()}
            if isinstance(values.get("environment"), dict):
                values["environment"] = {str(k): str(v) for k, v in values["environment"].items()}
            try:
                functions.append(FunctionConfig(**values))
            except ConfigError as exc:
                # Point at the offending field's own line when the file has it.
                node = fields.get(exc.field_name, (fn_node,))[0]
                reason = str(exc).split(": ", 1)[1]
                raise ConfigError(
                    f"{_at(source, node)}: functions[{index}].{reason}", exc.field_name
                ) from None
    settings = {key: value for key, (_, value) in top.items() if key != "functions"}
    for name in ("retry_delays_s", "throttle_retry_s"):
        if isinstance(settings.get(name), list):
            settings[name] = tuple(settings[name])
    try:
        return ServiceConfig(functions=tuple(functions), **settings)
    except ConfigError as exc:
        node = top.get(exc.field_name, (root,))[0]
        raise ConfigError(f"{_at(source, node)}: {exc}", exc.field_name) from None

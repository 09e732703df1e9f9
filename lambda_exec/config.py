"""The LambdaExecutor's settings: one frozen, typed object parsed once, at ``start()``.

Values come from the ``[lambda_executor]`` section of Airflow's configuration (declared with types and
defaults in ``hybrid_router.provider_info``) and can be overridden per executor instance with keyword
arguments (a routing policy's ``options``), so several instances can drive different functions.
A bad value raises ``LambdaConfigError`` naming the option and where it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from hybrid_router.redaction import shown_value

SECTION = "lambda_executor"

# Lambda's hard limit on a function's run time; the watchdog's bound when the function's own timeout is unknown.
LAMBDA_MAX_TIMEOUT_S = 900
# An async invoke payload is at most 1 MiB (256 KiB on some older accounts).
LAMBDA_MAX_ASYNC_PAYLOAD = 1024 * 1024
# Lambda's longest event age (6 h) + its longest timeout (15 min) + 15 min for a scheduler to adopt the run.
DEFAULT_UNOWNED_MESSAGE_MAX_AGE_S = 6 * 3600 + 30 * 60


class LambdaConfigError(ValueError):
    """A LambdaExecutor setting is missing or has a value of the wrong type or range."""


@dataclass(frozen=True)
class LambdaExecutorConfig:
    """Every setting the executor uses, already converted and checked."""

    function_name: str
    results_queue_url: str
    signing_secret: str
    qualifier: str = ""
    dead_letter_queue_url: str = ""
    region_name: str = ""
    lambda_endpoint_url: str = ""
    sqs_endpoint_url: str = ""
    aws_conn_id: str = ""
    max_invoke_workers: int = 16
    max_payload_bytes: int = LAMBDA_MAX_ASYNC_PAYLOAD
    reserved_concurrency: int | None = None
    poll_wait_seconds: int = 1
    throttle_backoff_max: float = 60.0
    check_health_on_startup: bool = True
    event_max_age_seconds: int = 300
    deadline_margin_seconds: float = 5.0
    # How often a run sends STARTED again; it stops itself after LEASE_HEARTBEATS without one (``liveness``).
    run_heartbeat_seconds: float = 30.0
    # Where the local Lambda service writes its log streams (``<dir>/<function>/<stream>.log``); set it to
    # show a local run's Lambda log in the task log view. Empty with real AWS: CloudWatch Logs is read.
    local_log_dir: str = ""
    # A message no executor holds is deleted once this old (by SQS's SentTimestamp): the longest a run's owner
    # could still adopt it is the event's max age + the function's timeout + the scheduler's orphan adoption.
    unowned_message_max_age: int = DEFAULT_UNOWNED_MESSAGE_MAX_AGE_S
    # Not in [lambda_executor] (rarely worth changing), but accepted as a per-instance option: a message the
    # executor fails to handle (a bug, not a malformed message) is deleted after this many receives.
    stale_after_sightings: int = 10

    def __repr__(self) -> str:
        # The secret must never reach a log line through a repr: values of non-secret options only.
        shown = ", ".join(f"{f.name}={shown_value(f.name, getattr(self, f.name))}" for f in fields(self))
        return f"LambdaExecutorConfig({shown})"

    __str__ = __repr__

    @property
    def secret(self) -> bytes:
        return self.signing_secret.encode("utf-8")

    @classmethod
    def load(cls, airflow_conf: Any, overrides: Mapping[str, Any] | None = None) -> LambdaExecutorConfig:
        """Build the config from ``[lambda_executor]`` in ``airflow_conf`` and per-instance ``overrides``.

        ``airflow_conf`` is anything with Airflow's ``get(section, key, fallback=...)`` (the executor's
        ``ExecutorConf``, which honours teams, or ``airflow.configuration.conf``).
        """
        overrides = dict(overrides or {})
        check_option_names(overrides)
        values: dict[str, Any] = {}
        for name, parse in _PARSERS.items():
            if name in overrides:
                raw, source = overrides[name], f"executor option {name!r}"
            else:
                raw = airflow_conf.get(SECTION, name, fallback=None)
                source = f"[{SECTION}] {name}"
            if raw is None or (isinstance(raw, str) and raw.strip() == ""):
                continue
            try:
                values[name] = parse(raw)
            except (TypeError, ValueError) as exc:
                raise LambdaConfigError(f"{source}: {exc} (got {shown_value(name, raw)})") from None
        for required in ("function_name", "results_queue_url", "signing_secret"):
            if not values.get(required):
                raise LambdaConfigError(
                    f"[{SECTION}] {required} is required: set it in airflow.cfg, as "
                    f"AIRFLOW__{SECTION.upper()}__{required.upper()}, or in the executor's options"
                )
        config = cls(**values)
        config._check_ranges()
        return config

    def _check_ranges(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.max_invoke_workers >= 1, "max_invoke_workers: must be at least 1"),
            (
                0 < self.max_payload_bytes <= LAMBDA_MAX_ASYNC_PAYLOAD,
                f"max_payload_bytes: must be between 1 and {LAMBDA_MAX_ASYNC_PAYLOAD}",
            ),
            (
                self.reserved_concurrency is None or self.reserved_concurrency >= 1,
                "reserved_concurrency: must be at least 1, or empty to ask Lambda",
            ),
            (0 <= self.poll_wait_seconds <= 20, "poll_wait_seconds: SQS allows 0 to 20"),
            (self.throttle_backoff_max > 0, "throttle_backoff_max: must be positive"),
            (
                60 <= self.event_max_age_seconds <= 6 * 3600,
                "event_max_age_seconds: Lambda allows 60 to 21600",
            ),
            (self.deadline_margin_seconds >= 0, "deadline_margin_seconds: must not be negative"),
            (
                self.run_heartbeat_seconds == 0 or 2 <= self.run_heartbeat_seconds <= 300,
                # Below 2 s a run's lease would leave no time for a send to fail and be tried again before
                # the run must begin to stop itself.
                "run_heartbeat_seconds: must be 0 (no heartbeats) or from 2 to 300",
            ),
            (
                self.unowned_message_max_age >= self.event_max_age_seconds + 60,
                "unowned_message_max_age: must exceed event_max_age_seconds by the function's timeout and "
                f"the scheduler's orphan adoption delay (default {DEFAULT_UNOWNED_MESSAGE_MAX_AGE_S})",
            ),
            (self.stale_after_sightings >= 2, "stale_after_sightings: must be at least 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise LambdaConfigError(f"[{SECTION}] {message}")


def check_option_names(options: Mapping[str, Any]) -> None:
    """Reject per-instance options this executor does not know (a typo in a policy file), naming them."""
    unknown = sorted(set(options) - _PARSERS.keys())
    if unknown:
        raise LambdaConfigError(
            f"unknown LambdaExecutor option(s) {', '.join(map(repr, unknown))}; "
            f"known options: {', '.join(sorted(_PARSERS))}"
        )


def _text(raw: Any) -> str:
    if not isinstance(raw, str):
        raise TypeError("expected a string")
    return raw.strip()


def _integer(raw: Any) -> int:
    if isinstance(raw, bool):
        raise TypeError("expected an integer")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
    raise TypeError("expected an integer")


def _number(raw: Any) -> float:
    if isinstance(raw, bool):
        raise TypeError("expected a number")
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw.strip())
        except ValueError:
            raise ValueError("expected a number") from None
    raise TypeError("expected a number")


_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError("expected a boolean (true or false)")


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "function_name": _text,
    "qualifier": _text,
    "results_queue_url": _text,
    "dead_letter_queue_url": _text,
    "region_name": _text,
    "lambda_endpoint_url": _text,
    "sqs_endpoint_url": _text,
    "signing_secret": _text,
    "aws_conn_id": _text,
    "max_invoke_workers": _integer,
    "max_payload_bytes": _integer,
    "reserved_concurrency": _integer,
    "poll_wait_seconds": _integer,
    "throttle_backoff_max": _number,
    "check_health_on_startup": _boolean,
    "event_max_age_seconds": _integer,
    "deadline_margin_seconds": _number,
    "run_heartbeat_seconds": _number,
    "local_log_dir": _text,
    "unowned_message_max_age": _integer,
    "stale_after_sightings": _integer,
}

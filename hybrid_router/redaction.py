"""Option values in errors and logs: names are shown, values only for options known not to be secret.

A message may name any option, but shows its value only when the option is in ``NON_SECRET_OPTIONS`` (where
and how much: a function, a region, a concurrency); every other value is ``***``. Text we did not write (an
exception from a child's constructor or ``start()``) has the configured values of every other option replaced
by ``***`` (``secret_values`` and ``scrub``) before it is logged or shown. Standard library only: the router and
the Lambda executor both use it, and ``lambda_exec`` never imports the router.
"""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Collection, Iterator, Mapping
from typing import Any

MASK = "***"

# Options whose values are never secret: names of AWS resources and connections, regions, sizes, counts and
# times. Anything else (a signing secret, a run_task_kwargs with environment overrides, an endpoint URL that
# may carry user:password) is masked.
NON_SECRET_OPTIONS = frozenset(
    {
        # the router's own and Airflow's
        "parallelism",
        "team_name",
        "max_concurrency",
        "prefetch",
        # the LambdaExecutor's ([lambda_executor])
        "function_name",
        "qualifier",
        "results_queue_url",
        "dead_letter_queue_url",
        "region_name",
        "aws_conn_id",
        "max_invoke_workers",
        "max_payload_bytes",
        "reserved_concurrency",
        "poll_wait_seconds",
        "throttle_backoff_max",
        "check_health_on_startup",
        "event_max_age_seconds",
        "deadline_margin_seconds",
        "run_heartbeat_seconds",
        "local_log_dir",
        "unowned_visibility_timeout",
        "stale_after_sightings",
        # the Amazon provider's executors ([aws_ecs_executor], [aws_batch_executor], [aws_lambda_executor])
        "conn_id",
        "cluster",
        "container_name",
        "task_definition",
        "launch_type",
        "platform_version",
        "assign_public_ip",
        "max_run_task_attempts",
        "max_invoke_attempts",
        "max_submit_job_attempts",
        "job_name",
        "job_queue",
        "job_definition",
        "function_qualifier",
        "queue_url",
        "end_wait_timeout",
    }
)

# Scrubbing replaces values in free text: a short value ("1", "EC2") would garble the text and hide nothing,
# so it is replaced only when it sits under a name that looks secret.
_MIN_SCRUBBED_LENGTH = 4
_SECRET_NAME = re.compile(r"secret|passw|token|key|credential|auth|private|signature", re.IGNORECASE)


def shown_value(name: str, value: Any) -> str:
    """``value`` as a message may show it: its repr for an option in ``NON_SECRET_OPTIONS``, else ``***``."""
    return repr(value) if name in NON_SECRET_OPTIONS else MASK


def shown_options(options: Mapping[str, Any]) -> str:
    """An options mapping as a message may show it: every name, the values of non-secret options only."""
    return "{" + ", ".join(f"{name!r}: {shown_value(name, value)}" for name, value in options.items()) + "}"


def secret_values(options: Mapping[str, Any]) -> frozenset[str]:
    """The text of every value (nested ones too) of the options not in ``NON_SECRET_OPTIONS``, to ``scrub``.

    Each value also as stripped (a setting read with its whitespace stripped) and as it appears inside a repr
    or JSON (escaped quotes, backslashes, newlines).
    """
    found: set[str] = set()
    for name, value in options.items():
        if name in NON_SECRET_OPTIONS:
            continue
        for secret_name, text in _leaves(str(name), value, False):
            for variant in (text, text.strip(), repr(text)[1:-1], json.dumps(text)[1:-1]):
                if len(variant) >= (1 if secret_name else _MIN_SCRUBBED_LENGTH):
                    found.add(variant)
    return frozenset(found)


def _leaves(name: str, value: Any, secret_name: bool) -> Iterator[tuple[bool, str]]:
    """``(whether any enclosing name looks secret, text)`` for each scalar value under ``name``."""
    secret_name = secret_name or bool(_SECRET_NAME.search(name))
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(str(key), item, secret_name)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _leaves(name, item, secret_name)
    elif value is not None and not isinstance(value, bool):
        yield secret_name, str(value)


def scrub(text: str, secrets: Collection[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***`` (the longest first)."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def error_text(err: BaseException, secrets: Collection[str], *, limit: int | None = 500) -> str:
    """``<type>: <message>`` of ``err`` with ``secrets`` scrubbed, capped at ``limit`` characters."""
    message = scrub(str(err), secrets)
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def traceback_text(err: BaseException, secrets: Collection[str]) -> str:
    """``err``'s traceback (its causes included) as ``log.exception`` would print it, ``secrets`` scrubbed."""
    return scrub("".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip(), secrets)

"""How the wire messages (``protocol``) check the fields of a payload they read, and the error they raise.

Standard library only: the handler imports this module (through ``protocol``) on every cold start.
"""

from __future__ import annotations

import math
import re
from typing import Any

HEX_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class MessageError(ValueError):
    """A message that is malformed, unsigned, wrongly signed or stale. Never carries a token."""


def required_str(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise MessageError(f"{name}: expected a non-empty string")
    return value


def optional_str(data: dict[str, Any], name: str) -> str:
    value = data.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MessageError(f"{name}: expected a string")
    return value


def optional_bool(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise MessageError(f"{name}: expected true or false")
    return value


def finite_number(data: dict[str, Any], name: str) -> float:
    value = data.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond a float's range
            number = math.inf
        # NaN or infinity would pass every comparison with a clock (never stale, never late).
        if math.isfinite(number):
            return number
    raise MessageError(f"{name}: expected a finite number")


def count(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MessageError(f"{name}: expected an integer >= 0")
    return value


def optional_count(data: dict[str, Any], name: str) -> int | None:
    return None if data.get(name) is None else count(data, name)


def hex_key(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not HEX_SHA256_RE.fullmatch(value):
        raise MessageError(f"{name}: expected 64 hexadecimal digits")
    return value

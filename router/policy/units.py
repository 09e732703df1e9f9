"""Durations and memory sizes as people write them in policy files and ``executor_config``."""

from __future__ import annotations

import math
import re

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*([a-z]+)", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(rf"\s*({_NUMBER})\s*")

# GB means GiB here, as in AWS's own Lambda limits ("10,240 MB" is sold as "10 GB").
_MEMORY_UNITS: dict[str, float] = {
    "": 1.0,
    "k": 1 / 1024,
    "kb": 1 / 1024,
    "kib": 1 / 1024,
    "m": 1.0,
    "mb": 1.0,
    "mib": 1.0,
    "g": 1024.0,
    "gb": 1024.0,
    "gib": 1024.0,
    "t": 1024.0 * 1024,
    "tb": 1024.0 * 1024,
    "tib": 1024.0 * 1024,
}
_MEMORY = re.compile(rf"\s*({_NUMBER})\s*([a-z]*)\s*", re.IGNORECASE)

DURATION_EXAMPLES = "'90s', '12m', '1h30m', '1.5h' or a number of seconds"
MEMORY_EXAMPLES = "'512' or 512 (MB), '512MB', '3GB', '2GiB'"


def is_plain_number(value: object) -> bool:
    """An int or float that is finite and not a bool (True is an int to Python, never a figure to a person)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too big for a float
        return False


def _number(value: object, what: str, examples: str) -> float | None:
    """A finite non-negative number from an int/float, or None when ``value`` is not a number at all."""
    if isinstance(value, bool):  # True is an int to Python, never a duration or a size to a person
        raise ValueError(f"invalid {what} {value!r}: expected {examples}")
    if isinstance(value, (int, float)):
        if not is_plain_number(value) or value < 0:
            raise ValueError(f"invalid {what} {_short(value)}: must be a finite number >= 0")
        return float(value)
    return None


def _finite(number: float, value: object, what: str) -> float:
    if not math.isfinite(number):  # "1" followed by 400 zeros reads as inf
        raise ValueError(f"invalid {what} {_short(value)}: too large")
    return number


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def parse_duration(value: str | float) -> float:
    """Seconds in ``value``: ``90``, ``"90"``, ``"90s"``, ``"12m"``, ``"1h30m"``, ``"1.5h"``, ``"2d"``.

    Units of a compound duration must be given largest first and each at most once ("1h30m", not "30m1h").
    Raises ValueError naming the value and the accepted forms.
    """
    number = _number(value, "duration", DURATION_EXAMPLES)
    if number is not None:
        return number
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: expected {DURATION_EXAMPLES}")
    plain = _PLAIN_NUMBER.fullmatch(value)
    if plain:
        return _finite(float(plain.group(1)), value, "duration")
    total = 0.0
    position = 0
    previous_scale = math.inf
    while position < len(value):
        part = _DURATION_PART.match(value, position)
        if part is None:
            if value[position:].strip():
                raise ValueError(f"invalid duration {value!r}: expected {DURATION_EXAMPLES}")
            break
        amount, unit = part.groups()
        scale = _DURATION_UNITS.get(unit.lower())
        if scale is None:
            raise ValueError(f"invalid duration {value!r}: unknown unit {unit!r} (use ms, s, m, h or d)")
        if scale >= previous_scale:
            raise ValueError(f"invalid duration {value!r}: give each unit once, largest first (like '1h30m')")
        previous_scale = scale
        total += float(amount) * scale
        position = part.end()
    if previous_scale == math.inf:
        raise ValueError(f"invalid duration {value!r}: expected {DURATION_EXAMPLES}")
    return _finite(total, value, "duration")


def parse_memory_mb(value: str | float) -> int:
    """Megabytes (MiB) in ``value``: ``512``, ``"512"``, ``"512MB"``, ``"3GB"``, ``"3 GiB"``, ``"10240MB"``.

    A bare number means MB; GB and GiB both mean 1024 MB. Fractions round up, so a task's need is never
    under-stated. Raises ValueError for anything else, and for zero.
    """
    number = _number(value, "memory size", MEMORY_EXAMPLES)
    if number is None:
        if not isinstance(value, str):
            raise ValueError(f"invalid memory size {value!r}: expected {MEMORY_EXAMPLES}")
        match = _MEMORY.fullmatch(value)
        if match is None:
            raise ValueError(f"invalid memory size {value!r}: expected {MEMORY_EXAMPLES}")
        amount, unit = match.groups()
        scale = _MEMORY_UNITS.get(unit.lower())
        if scale is None:
            raise ValueError(f"invalid memory size {value!r}: unknown unit {unit!r} (use MB, GB, MiB or GiB)")
        number = _finite(float(amount) * scale, value, "memory size")
    megabytes = math.ceil(number)
    if megabytes <= 0:
        raise ValueError(f"invalid memory size {value!r}: must be greater than 0")
    return megabytes


def format_duration(seconds: float) -> str:
    """The short form people write: 300 -> "5m", 5400 -> "1h30m", 2.5 -> "2.5s", 1234.56 -> "20m34.6s"."""
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    tenths = round(seconds * 10)
    hours, rest = divmod(tenths, 36000)
    minutes, rest = divmod(rest, 600)
    secs = rest / 10
    text = (
        (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs:g}s" if secs else "")
    )
    return text or "0s"


def format_memory(megabytes: int) -> str:
    return f"{megabytes} MB"

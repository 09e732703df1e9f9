"""What real AWS does that a local stand-in does not by itself: per-call latency and at-least-once delivery.

Off unless asked for (``faults:`` in the service's YAML, ``--faults`` on the command line, or ``POST
/_local/faults``): tests see an instant, faithful Lambda; benchmarks and fault-injection tests turn on

- ``invoke_latency``: each async Invoke is answered after a log-normal delay (median, p99);
- ``duplicate_rate``: the share of accepted async events that are delivered twice (same request id, as AWS
  does), ``duplicate_after_end_share`` of them only once the first run has ended, the rest at once;
- ``lost_answer_rate``: the share of accepted async events whose answer the caller never gets: a 500
  ``ServiceException`` (``lost_answer_mode: 5xx``) or a connection closed without an answer (``reset``), while
  the event stays accepted and runs.

Draws come from one seeded generator, so a run with a ``seed`` injects the same faults in the same order.
"""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

# A log-normal's p99 is median * exp(2.3263 * sigma).
_Z99 = 2.3263478740408408
LOST_ANSWER_MODES = ("5xx", "reset", "mixed")
FAULT_COUNTERS = ("duplicates_delivered", "duplicates_after_end", "invoke_answers_lost")


class FaultConfigError(ValueError):
    """A bad fault setting; the message names the field."""


@dataclass(frozen=True)
class Latency:
    """A log-normal per-call latency: half the calls are faster than ``median_s``, 1% slower than ``p99_s``."""

    median_s: float
    p99_s: float

    def __post_init__(self) -> None:
        if not (self.median_s > 0 and self.p99_s >= self.median_s):
            raise FaultConfigError(f"latency: expected 0 < median <= p99, got {self.median_s}, {self.p99_s}")

    @classmethod
    def from_median_ms(cls, median_ms: float, p99_factor: float = 3.0) -> Latency:
        return cls(median_ms / 1000.0, median_ms * p99_factor / 1000.0)

    @property
    def sigma(self) -> float:
        return math.log(self.p99_s / self.median_s) / _Z99

    def sample(self, rng: random.Random) -> float:
        return rng.lognormvariate(math.log(self.median_s), self.sigma)


class Duplicate(Enum):
    NOW = "now"
    AFTER_END = "after_end"


class LostAnswer(Enum):
    SERVER_ERROR = "5xx"
    RESET = "reset"


@dataclass(frozen=True)
class FaultSettings:
    invoke_latency: Latency | None = None
    duplicate_rate: float = 0.0
    duplicate_after_end_share: float = 0.5
    lost_answer_rate: float = 0.0
    lost_answer_mode: str = "mixed"
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("duplicate_rate", "duplicate_after_end_share", "lost_answer_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise FaultConfigError(f"faults.{name}: expected a number from 0 to 1, got {value!r}")
        if self.lost_answer_mode not in LOST_ANSWER_MODES:
            raise FaultConfigError(
                f"faults.lost_answer_mode: expected one of {list(LOST_ANSWER_MODES)}, got {self.lost_answer_mode!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultSettings:
        """From YAML or JSON: ``invoke_latency_ms: 25`` (p99 3x) or ``{median_ms: 25, p99_ms: 75}``."""
        if not isinstance(data, Mapping):
            raise FaultConfigError(f"faults: expected a mapping, got {type(data).__name__}")
        known = {"invoke_latency_ms", *(f for f in cls.__dataclass_fields__ if f != "invoke_latency")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FaultConfigError(f"faults.{unknown[0]}: unknown setting; known: {sorted(known)}")
        values = {key: value for key, value in data.items() if key != "invoke_latency_ms"}
        if data.get("invoke_latency_ms") is not None:
            values["invoke_latency"] = _latency(data["invoke_latency_ms"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        latency = data.pop("invoke_latency")
        data["invoke_latency_ms"] = (
            None
            if latency is None
            else {"median_ms": latency["median_s"] * 1000, "p99_ms": latency["p99_s"] * 1000}
        )
        return data


def _latency(value: Any) -> Latency:
    try:
        if isinstance(value, Mapping):
            median = float(value["median_ms"])
            return Latency(median / 1000.0, float(value.get("p99_ms", median * 3)) / 1000.0)
        if isinstance(value, bool):
            raise TypeError
        return Latency.from_median_ms(float(value))
    except (KeyError, TypeError, ValueError):
        raise FaultConfigError(
            f"faults.invoke_latency_ms: expected a median in ms or {{median_ms, p99_ms}}, got {value!r}"
        ) from None


class Faults:
    """The live injector: draws each fault from the settings, counts what it injected. Thread-safe."""

    def __init__(self, settings: FaultSettings | None = None) -> None:
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter(dict.fromkeys(FAULT_COUNTERS, 0))
        self.configure(settings or FaultSettings())

    def configure(self, settings: FaultSettings) -> None:
        with self._lock:
            self.settings = settings
            self._rng = random.Random(settings.seed)
            self._lost_in_turn = 0

    def invoke_delay_s(self) -> float:
        with self._lock:
            latency = self.settings.invoke_latency
            return 0.0 if latency is None else latency.sample(self._rng)

    def duplicate(self) -> Duplicate | None:
        """Whether an accepted event is delivered a second time, and when."""
        with self._lock:
            if not self.settings.duplicate_rate or self._rng.random() >= self.settings.duplicate_rate:
                return None
            after_end = self._rng.random() < self.settings.duplicate_after_end_share
            self.counters["duplicates_delivered"] += 1
            if after_end:
                self.counters["duplicates_after_end"] += 1
            return Duplicate.AFTER_END if after_end else Duplicate.NOW

    def lost_answer(self) -> LostAnswer | None:
        """Whether the caller of an accepted Invoke gets no answer, and how it sees that."""
        with self._lock:
            if not self.settings.lost_answer_rate or self._rng.random() >= self.settings.lost_answer_rate:
                return None
            self.counters["invoke_answers_lost"] += 1
            mode = self.settings.lost_answer_mode
            if mode == "mixed":
                self._lost_in_turn += 1
                mode = "5xx" if self._lost_in_turn % 2 else "reset"
            return LostAnswer(mode)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"settings": self.settings.to_dict(), **self.counters}

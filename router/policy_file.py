"""The policy file behind a running router: read at start, read again when it changed, the last good kept."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybrid_router.router.policy import Policy

log = logging.getLogger(__name__)


class PolicyFile:
    """Watches one policy file; ``reload_if_due`` looks at it at most every ``reload_interval`` seconds."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reload_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._reload_interval = reload_interval
        self._clock = clock
        self._stamp: tuple[int, int] | None = None
        self._next_check_at = float("inf")

    def load(self) -> Policy:
        """Read the file now; raises ``PolicyError`` when it is invalid."""
        policy = self._read()
        self._stamp = self._file_stamp()
        return policy

    def start_watching(self) -> None:
        self._next_check_at = self._clock() + self._reload_interval

    def reload_if_due(self, current: Policy) -> Policy | None:
        now = self._clock()
        if now < self._next_check_at:
            return None
        self._next_check_at = now + self._reload_interval
        return self.reload(current)

    def reload(self, current: Policy) -> Policy | None:
        """The file's new policy if it changed and is good; None keeps ``current``, with the reason logged."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return None
        # Stamped before reading: a broken file is reported once, not at every check until it changes again.
        self._stamp = stamp
        try:
            policy = self._read()
        except Exception as err:
            issues = getattr(err, "issues", None)
            log.error(
                "Policy reload from %s failed; routing goes on with the last good policy: %s%s",
                self.path,
                err,
                "".join(f"\n  {issue}" for issue in issues) if issues else "",
            )
            return None
        if dict(policy.executors) != dict(current.executors):
            log.error(
                "Policy reload from %s changes the executors section; that takes a scheduler restart. "
                "Routing goes on with the last good policy.",
                self.path,
            )
            return None
        log.info("Policy reloaded from %s", self.path)
        return policy

    def _read(self) -> Policy:
        from hybrid_router.router.policy import load_policy

        return load_policy(self.path)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except (OSError, TypeError):
            return None
        return st.st_mtime_ns, st.st_size

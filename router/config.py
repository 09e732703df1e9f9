"""Typed access to the ``[hybrid_router]`` section of Airflow's configuration.

Read once, when the router (or a CLI command) starts, never at import time: the API server and
``airflow dags test`` import executors without running them, and tests change the configuration.
The options, their defaults and descriptions are declared in ``hybrid_router.provider_info``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hybrid_router.policies import DEFAULT_POLICY

if TYPE_CHECKING:
    from airflow.configuration import AirflowConfigParser

SECTION = "hybrid_router"
DEFAULT_POLICY_FILE_NAME = "hybrid_router_policy.yaml"


class RouterConfigError(ValueError):
    """A ``[hybrid_router]`` option has a value the router cannot use; the message names the option."""


def resolve_policy_file(configured: str, airflow_home: str) -> tuple[Path, bool]:
    """Return the policy file to load and whether it is the packaged default.

    Only the default location may be missing (a fresh install routes by the packaged policy); a path the user
    set must exist, because silently routing by another policy than the one configured is worse than refusing.
    """
    path = Path(os.path.expanduser(configured))
    default_location = Path(airflow_home, DEFAULT_POLICY_FILE_NAME)
    if path.is_file():
        return path, False
    if path == default_location:
        return DEFAULT_POLICY, True
    raise RouterConfigError(
        f"[{SECTION}] policy_file = {configured}: no such file. Create it, or remove the option to use "
        f"{default_location} when it exists and the packaged default policy otherwise."
    )


@dataclass(frozen=True)
class RouterConfig:
    policy_file: Path
    policy_file_is_packaged_default: bool = False
    reload_interval: float = 30.0
    history_days: int = 14
    history_cache_ttl: float = 300.0
    history_min_runs: int = 3
    audit_log: bool = True
    live_state_interval: float = 1.0

    def __post_init__(self) -> None:
        bounds = (
            ("reload_interval", self.reload_interval > 0, "> 0 seconds"),
            ("history_days", self.history_days >= 0, ">= 0 (0 disables the history lookup)"),
            ("history_cache_ttl", self.history_cache_ttl >= 0, ">= 0 seconds"),
            ("history_min_runs", self.history_min_runs >= 1, ">= 1"),
            ("live_state_interval", self.live_state_interval >= 0, ">= 0 seconds (0 turns publishing off)"),
        )
        for option, within, expected in bounds:
            if not within:
                value = getattr(self, option)
                raise RouterConfigError(f"[{SECTION}] {option} must be {expected}, got {value}")

    @property
    def history_enabled(self) -> bool:
        return self.history_days > 0

    @classmethod
    def from_airflow_conf(cls, conf: AirflowConfigParser | None = None) -> RouterConfig:
        """Read the section from Airflow's configuration (``airflow.configuration.conf`` by default).

        Airflow's own parser raises ``AirflowConfigException`` naming the option for a value of the wrong
        type; out-of-range values raise ``RouterConfigError``.
        """
        from airflow.configuration import AIRFLOW_HOME

        if conf is None:
            from airflow.configuration import conf

        policy_file, packaged = resolve_policy_file(conf.get(SECTION, "policy_file"), AIRFLOW_HOME)
        return cls(
            policy_file=policy_file,
            policy_file_is_packaged_default=packaged,
            reload_interval=conf.getfloat(SECTION, "reload_interval"),
            history_days=conf.getint(SECTION, "history_days"),
            history_cache_ttl=conf.getfloat(SECTION, "history_cache_ttl"),
            history_min_runs=conf.getint(SECTION, "history_min_runs"),
            audit_log=conf.getboolean(SECTION, "audit_log"),
            live_state_interval=conf.getfloat(SECTION, "live_state_interval"),
        )

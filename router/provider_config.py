"""Policy ``options`` for executors that read their settings from a provider config section.

The Amazon provider's executors (``AwsEcsExecutor``, ``AwsBatchExecutor``, ``AwsLambdaExecutor``) take no
settings in their constructors: during ``__init__`` they read ``[aws_ecs_executor]`` and the like through
``self.conf``, the ``ExecutorConf`` that ``BaseExecutor.__init__`` assigns. So that two children of one such
class can differ (a standard and a 16 GB ECS task definition, say), each child built with options gets a
per-child subclass whose ``conf`` is an :class:`OptionsConf`: the child's options answer first for the
provider's section, Airflow's configuration answers everything else.

The section and its keys come from the provider's own config-keys module (``<executor package>.utils``:
``CONFIG_GROUP_NAME`` and the ``All*ConfigKeys`` class), so a provider release that adds a key needs no change
here.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow.executors.base_executor import ExecutorConf

from hybrid_router.redaction import shown_value

_TRUE = {"t", "true", "1", "yes", "on"}
_FALSE = {"f", "false", "0", "no", "off"}


@dataclass(frozen=True)
class ProviderSection:
    """The config section an executor class reads, and every key the provider defines for it."""

    name: str
    keys: frozenset[str]


def provider_section(cls: type) -> ProviderSection | None:
    """The provider section ``cls`` (or the provider executor it extends) reads, or None.

    Found the way the Amazon provider lays its executors out: ``<package>/utils.py`` beside the executor
    module holds ``CONFIG_GROUP_NAME`` and an ``All...ConfigKeys`` class listing the section's keys.
    """
    for klass in cls.__mro__:
        package = klass.__module__.rpartition(".")[0]
        if not package.startswith("airflow.providers."):
            continue
        try:
            utils = importlib.import_module(f"{package}.utils")
        except ImportError:
            continue
        section = getattr(utils, "CONFIG_GROUP_NAME", None)
        keys_class = next(
            (
                value
                for name, value in vars(utils).items()
                if name.startswith("All") and name.endswith("ConfigKeys") and isinstance(value, type)
            ),
            None,
        )
        if isinstance(section, str) and keys_class is not None:
            return ProviderSection(section, frozenset(_config_keys(keys_class)))
    return None


def _config_keys(keys_class: type) -> set[str]:
    # The provider's BaseConfigKeys.__iter__ lists only the class's own attributes, not inherited ones
    # (AllEcsConfigKeys would miss cluster, task_definition, ...): walk the whole hierarchy.
    return {
        value
        for klass in keys_class.__mro__
        for name, value in vars(klass).items()
        if not name.startswith("_") and isinstance(value, str)
    }


def as_config_string(value: Any) -> str:
    """A policy option as Airflow's config would hold it: JSON for mappings and lists, ``True``/``False``."""
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value)
    return str(value)


class OptionsConf(ExecutorConf):
    """An ``ExecutorConf`` that answers ``(section, key)`` from one child's policy options first.

    Everything not in the options (other sections, keys left out) goes to ``base``: what the executor's
    ``__init__`` assigned, normally ``ExecutorConf(team_name)``, so team-specific settings still apply.
    """

    def __init__(self, base: Any, section: str, options: Mapping[str, Any]) -> None:
        super().__init__(getattr(base, "team_name", None))
        self.base = base
        self.section = section
        self.options = dict(options)

    def _option(self, section: str, key: str) -> tuple[bool, Any]:
        if section == self.section and key in self.options:
            return True, self.options[key]
        return False, None

    def get(self, section: str, key: str, *args: Any, **kwargs: Any) -> str | None:
        found, value = self._option(section, key)
        return as_config_string(value) if found else self.base.get(section, key, *args, **kwargs)

    def get_mandatory_value(self, section: str, key: str, *args: Any, **kwargs: Any) -> str:
        found, value = self._option(section, key)
        return (
            as_config_string(value) if found else self.base.get_mandatory_value(section, key, *args, **kwargs)
        )

    def getboolean(self, section: str, key: str, *args: Any, **kwargs: Any) -> bool:
        found, value = self._option(section, key)
        if not found:
            return self.base.getboolean(section, key, *args, **kwargs)
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(
            f"option {key!r} of [{section}] must be true or false, not {shown_value(key, value)}"
        )

    def getint(self, section: str, key: str, *args: Any, **kwargs: Any) -> int:
        found, value = self._option(section, key)
        if not found:
            return self.base.getint(section, key, *args, **kwargs)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"option {key!r} of [{section}] must be an integer, not {shown_value(key, value)}"
            ) from None

    def getjson(self, section: str, key: str, *args: Any, **kwargs: Any) -> Any:
        found, value = self._option(section, key)
        if not found:
            return self.base.getjson(section, key, *args, **kwargs)
        return json.loads(value) if isinstance(value, str) else value

    def has_option(self, section: str, key: str, *args: Any, **kwargs: Any) -> bool:
        return self._option(section, key)[0] or self.base.has_option(section, key, *args, **kwargs)

    def getsection(self, section: str) -> dict[str, str | int | float | bool] | None:
        values = self.base.getsection(section)
        if section != self.section:
            return values
        return {**(values or {}), **{key: as_config_string(v) for key, v in self.options.items()}}


def with_options(cls: type, section: str, options: Mapping[str, Any]) -> type:
    """A subclass of ``cls`` whose instances read ``options`` first for ``section``.

    ``conf`` becomes a property: whatever the executor's ``__init__`` assigns (``BaseExecutor`` assigns an
    ``ExecutorConf``; older provider code the global config) is wrapped as it is assigned, so the overlay is
    in place before the executor's own ``__init__`` reads its settings. Called once per child.
    """
    frozen = dict(options)

    def get_conf(self: Any) -> Any:
        try:
            return self.__dict__["conf"]
        except KeyError:
            # AttributeError, so that the provider's ``hasattr(self, "conf")`` check works before assignment.
            raise AttributeError("conf") from None

    def set_conf(self: Any, base: Any) -> None:
        self.__dict__["conf"] = base if isinstance(base, OptionsConf) else OptionsConf(base, section, frozen)

    # Same name and module as the class it extends: logs, ``repr`` and ``ExecutorName`` read the same.
    return type(
        cls.__name__,
        (cls,),
        {
            "conf": property(get_conf, set_conf),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )

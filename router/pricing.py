"""What a run costs on each executor of a policy, in US dollars.

The price table is AWS's list prices for one region and date (``policies/prices.yaml``, which names its sources
and the date), with a policy's ``pricing`` section over it and a ``--prices FILE`` over that. How an executor
is billed comes from its entry under the table's ``executors``, else from its class:

- ``lambda`` (the router's LambdaExecutor, the provider's AwsLambdaExecutor): per request, and per GB-second of
  the function's memory size: the entry's ``memory_mb``, else ``limits.max_memory_mb`` (which is the function's
  size), else Lambda's own default of 128 MB;
- ``fargate`` (the provider's ECS and Batch executors, unless ``options.launch_type`` is EC2): per vCPU-hour and
  GB-hour of the task's size (``vcpu``, ``memory_mb``; 1 vCPU and 2 GB when not given), a run billed at least
  ``fargate.minimum_billed`` (AWS: one minute);
- ``slot`` (the rest: LocalExecutor, Celery, Kubernetes, ECS on EC2): per task slot and hour, the entry's
  ``slot_hour_usd`` or the table's. AWS cannot know it: 0 until someone gives it, and every report says so.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hybrid_router.router.policy import ExecutorSpec
from hybrid_router.router.policy.prices import load_prices

LAMBDA, FARGATE, SLOT = "lambda", "fargate", "slot"
DEFAULT_ARCHITECTURE = "x86_64"
LAMBDA_DEFAULT_MEMORY_MB = 128  # what Lambda gives a function created without a memory size
FARGATE_DEFAULT_VCPU = 1.0
FARGATE_DEFAULT_MEMORY_MB = 2048


@dataclass(frozen=True)
class Billing:
    """How one executor's runs are billed."""

    executor: str
    kind: str  # LAMBDA, FARGATE or SLOT
    per_run_usd: float  # Lambda's request price
    per_second_usd: float
    minimum_s: float  # a shorter run is billed this long (Fargate)
    description: str  # "lambda x86_64, 1,024 MB function (limits.max_memory_mb)"
    # Figures nobody gave, which the report lists: a slot price of 0, a Fargate task size
    assumed: tuple[str, ...] = ()
    memory_mb: int | None = None  # the function's or task's memory size, when the billing has one

    @property
    def priced(self) -> bool:
        """Whether someone said what this executor costs (an unpriced slot is not free, merely unknown)."""
        return not (self.kind == SLOT and self.assumed)

    def run_cost(self, seconds: float, runs: float = 1.0) -> float:
        """Dollars for ``runs`` runs of ``seconds`` each."""
        return runs * (self.per_run_usd + max(seconds, self.minimum_s) * self.per_second_usd)


@dataclass(frozen=True)
class PriceTable:
    """A checked price table, defaults and overrides merged (``price_table``)."""

    table: Mapping[str, Any]

    @property
    def region(self) -> str:
        return str(self.table.get("region", "unknown region"))

    @property
    def taken(self) -> str:
        return str(self.table.get("taken", "unknown date"))

    def describe(self) -> str:
        return f"AWS list prices for {self.region} taken {self.taken}"

    def to_dict(self) -> dict[str, Any]:
        return {"region": self.region, "taken": self.taken, "sources": list(self.table.get("sources", []))}

    def entry(self, executor: str) -> dict[str, Any]:
        """The table's ``executors`` entry for ``executor`` (empty when it has none)."""
        return dict(self.table.get("executors", {}).get(executor, {}))

    def with_entry(self, executor: str, entry: Mapping[str, Any]) -> PriceTable:
        """This table with ``executor`` billed as ``entry`` says (for an executor a proposal adds)."""
        return PriceTable(_merged(self.table, {"executors": {executor: dict(entry)}}))

    def billing(self, spec: ExecutorSpec) -> Billing:
        """How ``spec``'s runs are billed under this table."""
        entry = self.entry(spec.name)
        kind = entry.get("billing") or billing_kind(spec)
        architecture = entry.get("architecture", DEFAULT_ARCHITECTURE)
        where = f"pricing.executors.{spec.name}"
        if kind == LAMBDA:
            prices = self.table["lambda"][architecture]
            memory, source = entry.get("memory_mb"), where
            if memory is None:
                memory, source = spec.limits.max_memory_mb, "limits.max_memory_mb"
            if memory is None:
                memory, source = LAMBDA_DEFAULT_MEMORY_MB, "Lambda's default"
            return Billing(
                spec.name,
                kind,
                per_run_usd=prices["request_usd"],
                per_second_usd=prices["gb_second_usd"] * memory / 1024,
                minimum_s=0.0,
                description=f"lambda {architecture}, {memory:,} MB function ({source})",
                memory_mb=memory,
            )
        if kind == FARGATE:
            prices = self.table["fargate"][architecture]
            vcpu = entry.get("vcpu", FARGATE_DEFAULT_VCPU)
            memory = entry.get("memory_mb", FARGATE_DEFAULT_MEMORY_MB)
            assumed = () if "vcpu" in entry and "memory_mb" in entry else (f"task size not in {where}",)
            hourly = vcpu * prices["vcpu_hour_usd"] + memory / 1024 * prices["gb_hour_usd"]
            return Billing(
                spec.name,
                kind,
                per_run_usd=0.0,
                per_second_usd=hourly / 3600,
                minimum_s=self.table["fargate"].get("minimum_billed_s", 60.0),
                description=f"fargate {architecture}, {vcpu:g} vCPU / {memory:,} MB task",
                assumed=assumed,
                memory_mb=memory,
            )
        hourly = entry.get("slot_hour_usd")
        assumed = ()
        if hourly is None:
            hourly = self.table.get("slot_hour_usd", 0.0)
            if not hourly:
                assumed = (f"no slot price given: counted as $0; set {where}.slot_hour_usd",)
        return Billing(
            spec.name,
            SLOT,
            per_run_usd=0.0,
            per_second_usd=hourly / 3600,
            minimum_s=0.0,
            description=f"slot, ${hourly:g} per slot-hour",
            assumed=assumed,
        )


def billing_kind(spec: ExecutorSpec) -> str:
    """LAMBDA, FARGATE or SLOT, from the executor's class (and ECS's launch type)."""
    name = spec.class_path.rpartition(".")[2].lower()
    if "lambda" in name:
        return LAMBDA
    if any(word in name for word in ("ecs", "batch", "fargate")):
        launch_type = str(spec.options.get("launch_type", "")).upper()
        return SLOT if launch_type == "EC2" else FARGATE
    return SLOT


@functools.cache
def _packaged_table() -> dict[str, Any]:
    from hybrid_router.policies import PRICES

    return load_prices(PRICES)


def price_table(*overrides: Mapping[str, Any] | None) -> PriceTable:
    """The packaged table with each of ``overrides`` (checked tables, e.g. ``Policy.pricing``) over it, in order."""
    table = copy.deepcopy(_packaged_table())
    for override in overrides:
        if override:
            table = _merged(table, override)
    return PriceTable(table)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged

"""Price tables: a policy's ``pricing`` section and price files (``simulate --prices FILE``, the packaged
``policies/prices.yaml``) share one shape, the schema's ``$defs/pricing``, and are checked here.

What the prices mean (what a run costs) is ``router/pricing.py``'s business; this module only makes sure every
figure is a usable one and says where one is not, as ``file:line:col: path: message``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import PolicyError, PolicyIssue, did_you_mean
from .source import ROOT_PATH_NAME, FieldPath, load_yaml
from .units import is_plain_number, parse_duration, parse_memory_mb

PRICE_KEYS: Mapping[str, tuple[str, ...]] = {
    "lambda": ("gb_second_usd", "request_usd"),
    "fargate": ("vcpu_hour_usd", "gb_hour_usd"),
}
ARCHITECTURES = ("x86_64", "arm64")

Report = Callable[..., None]  # (path, message, at_key=False)


def check_pricing(
    raw: Mapping[str, Any],
    base: FieldPath,
    report: Report,
    usable: Callable[[FieldPath], bool],
    executors: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The table in ``raw`` (already checked against the schema) with sizes and durations parsed.

    Reports, through ``report(path, message)``, what the schema cannot see: a figure that is not finite, a
    memory size or duration that does not parse and, when ``executors`` is given, an entry for an executor the
    policy does not define. Fields the schema rejected (``usable`` false) are skipped, never judged twice.
    """
    table: dict[str, Any] = {}
    for key in ("region", "taken"):
        if isinstance(raw.get(key), str):
            table[key] = raw[key]
    if isinstance(raw.get("sources"), list):
        table["sources"] = [source for source in raw["sources"] if isinstance(source, str)]
    for kind, keys in PRICE_KEYS.items():
        section = raw.get(kind)
        if not isinstance(section, dict):
            continue
        for architecture in ARCHITECTURES:
            prices = section.get(architecture)
            if isinstance(prices, dict):
                path = (*base, kind, architecture)
                found = {key: _price((*path, key), prices.get(key), report, usable) for key in keys}
                table.setdefault(kind, {})[architecture] = {k: v for k, v in found.items() if v is not None}
        minimum = section.get("minimum_billed")
        path = (*base, kind, "minimum_billed")
        if minimum is not None and usable(path):
            try:
                table.setdefault(kind, {})["minimum_billed_s"] = parse_duration(minimum)
            except ValueError as error:
                report(path, str(error))
    slot = _price((*base, "slot_hour_usd"), raw.get("slot_hour_usd"), report, usable)
    if slot is not None:
        table["slot_hour_usd"] = slot
    entries = raw.get("executors")
    if isinstance(entries, dict):
        table["executors"] = {
            name: _billing((*base, "executors", name), entry, report, usable)
            for name, entry in entries.items()
            if isinstance(entry, dict) and _known(base, name, executors, report, usable)
        }
    return table


def _known(
    base: FieldPath, name: str, executors: Mapping[str, Any] | None, report: Report, usable: Callable
) -> bool:
    path = (*base, "executors", name)
    if executors is None or name in executors:
        return True
    if usable(path) and executors:
        report(path, f"unknown executor {name!r}{did_you_mean(name, executors)}", at_key=True)
    return False


def _billing(path: FieldPath, entry: dict[str, Any], report: Report, usable: Callable) -> dict[str, Any]:
    billing = {key: entry[key] for key in ("billing", "architecture") if key in entry}
    vcpu = entry.get("vcpu")
    if vcpu is not None and usable((*path, "vcpu")):
        if is_plain_number(vcpu):
            billing["vcpu"] = float(vcpu)
        else:
            report((*path, "vcpu"), f"must be a finite number, got {vcpu!r}")
    memory = entry.get("memory_mb")
    if memory is not None and usable((*path, "memory_mb")):
        try:
            billing["memory_mb"] = parse_memory_mb(memory)
        except ValueError as error:
            report((*path, "memory_mb"), str(error))
    slot = _price((*path, "slot_hour_usd"), entry.get("slot_hour_usd"), report, usable)
    if slot is not None:
        billing["slot_hour_usd"] = slot
    return billing


def _price(path: FieldPath, value: Any, report: Report, usable: Callable) -> float | None:
    if value is None or not usable(path):
        return None
    # the schema's minimum lets NaN and infinity through; a bool is no price either
    if not is_plain_number(value) or value < 0:
        report(path, f"must be a finite number of dollars >= 0, got {value!r}")
        return None
    return float(value)


def load_prices(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a price file (YAML or JSON); raises PolicyError listing every problem with its place."""
    filename = os.fspath(path)
    try:
        text = Path(filename).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError(
            [PolicyIssue(filename, 1, 1, ROOT_PATH_NAME, f"cannot read the price file: {error}")]
        ) from None
    return load_prices_text(text, filename)


def load_prices_text(text: str, filename: str = "<string>") -> dict[str, Any]:
    """Check a price table given as text; ``filename`` is what issues call it."""
    from .loader import explain_schema_error  # the loader imports this module

    document = load_yaml(text, filename)
    issues = [issue for _, issue in document.issues]
    flagged: set[FieldPath] = set(document.rejected)

    def report(field: FieldPath, message: str, at_key: bool = False) -> None:
        issues.append(document.source.issue(field, message, at_key=at_key))
        flagged.add(field)

    def usable(field: FieldPath) -> bool:
        return not any(field[:length] in flagged for length in range(len(field) + 1))

    for error in _validator().iter_errors(document.value):
        for field, message, at_key in explain_schema_error(error):
            if usable(field):
                report(field, message, at_key)
    table = check_pricing(document.value if isinstance(document.value, dict) else {}, (), report, usable)
    if issues:
        raise PolicyError(issues)
    return table


@functools.cache
def _validator() -> Any:
    import json

    import jsonschema

    from hybrid_router.policies import SCHEMA

    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator({"$ref": "#/$defs/pricing", "$defs": schema["$defs"]})

"""The provider metadata Airflow loads from our entry point: a bad one breaks every ``airflow`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import airflow
import jsonschema
import pytest
from packaging.utils import canonicalize_name

from hybrid_router.provider_info import get_provider_info

OPTION_KEYS = {"description", "version_added", "type", "example", "default", "sensitive"}


def test_provider_info_is_valid_against_the_schema_airflow_ships():
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    # the same validator class Airflow's providers manager builds from this schema
    validator = jsonschema.validators.validator_for(schema)(schema)
    validator.validate(get_provider_info())


def test_package_name_matches_the_installed_distribution():
    # Airflow refuses to start when these differ
    entry_point = next(
        ep
        for ep in distribution("airflow-hybrid-router").entry_points
        if ep.group == "apache_airflow_provider"
    )
    assert entry_point.value == "hybrid_router.provider_info:get_provider_info"
    assert get_provider_info()["package-name"] == canonicalize_name(
        distribution("airflow-hybrid-router").name
    )


def test_every_option_is_complete_and_its_default_parses_as_its_type():
    # the schema does not enforce additional_properties on options, nor that a default fits its type
    for section in get_provider_info()["config"].values():
        for name, option in section["options"].items():
            assert set(option) <= OPTION_KEYS, name
            assert option["description"].strip(), name
            default = option["default"]
            assert default is None or isinstance(default, str), name
            if default in (None, ""):
                continue
            if option["type"] == "integer":
                int(default)
            elif option["type"] == "float":
                float(default)
            elif option["type"] == "boolean":
                assert default in ("True", "False"), name


def test_router_options_and_defaults():
    options = get_provider_info()["config"]["hybrid_router"]["options"]
    assert {name: option["default"] for name, option in options.items()} == {
        "policy_file": "{AIRFLOW_HOME}/hybrid_router_policy.yaml",
        "reload_interval": "30",
        "history_days": "14",
        "history_cache_ttl": "300",
        "history_min_runs": "3",
        "audit_log": "True",
        "live_state_interval": "1",
    }
    lambda_options = get_provider_info()["config"]["lambda_executor"]["options"]
    assert lambda_options["signing_secret"]["sensitive"] is True
    assert lambda_options["max_payload_bytes"]["default"] == "1048576"


def test_airflow_itself_treats_every_secret_option_as_sensitive():
    # What `airflow config list --show-values --hide-sensitive` hides and conf.mask_secrets() masks in logs.
    from airflow.configuration import conf

    sensitive = conf.sensitive_config_values
    assert ("lambda_executor", "signing_secret") in sensitive
    for section, declared in get_provider_info()["config"].items():
        for name in declared["options"]:
            if any(word in name for word in ("secret", "password", "token", "key")):
                assert (section, name) in sensitive, f"[{section}] {name}: declare it sensitive=True"


def test_cli_group_does_not_clash_with_airflow_commands():
    from airflow._shared.module_loading import import_string
    from airflow.cli.cli_config import core_commands

    (path,) = get_provider_info()["cli"]
    (group,) = import_string(path)()
    assert group.name == "hybrid-router"
    assert group.name not in {command.name for command in core_commands}
    assert {command.name for command in group.subcommands} == {"validate", "explain", "simulate", "recommend"}


def test_cli_module_stays_light():
    # imported by every `airflow` call: no policy engine, AWS SDK, YAML or database layer at import time
    code = (
        "import sys, hybrid_router.router.cli, hybrid_router.provider_info\n"
        "heavy = ('airflow', 'boto3', 'botocore', 'yaml', 'sqlalchemy', 'hybrid_router.router.policy',"
        " 'hybrid_router.router.cli_commands')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("section", ["hybrid_router", "lambda_executor"])
def test_sections_have_descriptions(section):
    assert get_provider_info()["config"][section]["description"]


def test_declared_lambda_options_are_the_ones_the_executor_reads():
    from dataclasses import fields

    from hybrid_router.lambda_exec.config import LambdaExecutorConfig

    declared = set(get_provider_info()["config"]["lambda_executor"]["options"])
    assert declared <= {field.name for field in fields(LambdaExecutorConfig)}

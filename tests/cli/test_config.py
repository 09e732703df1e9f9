"""RouterConfig: typed, validated access to [hybrid_router], read when asked and not at import."""

from __future__ import annotations

import pytest
from airflow.configuration import conf
from airflow.exceptions import AirflowConfigException

from hybrid_router.policies import DEFAULT_POLICY
from hybrid_router.router.config import RouterConfig, RouterConfigError, resolve_policy_file


@pytest.fixture
def section(monkeypatch):
    """Set [hybrid_router] options for one test through AIRFLOW__HYBRID_ROUTER__* variables."""

    def set_option(key: str, value: str) -> None:
        monkeypatch.setenv(f"AIRFLOW__HYBRID_ROUTER__{key.upper()}", value)

    return set_option


def test_defaults(section, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    section("policy_file", str(policy))
    config = RouterConfig.from_airflow_conf(conf)
    assert config == RouterConfig(policy_file=policy)
    assert (config.reload_interval, config.history_days, config.history_cache_ttl) == (30.0, 14, 300.0)
    assert (config.history_min_runs, config.audit_log) == (3, True)
    assert config.history_enabled


def test_environment_overrides_are_typed(section, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    section("policy_file", str(policy))
    section("reload_interval", "7.5")
    section("history_days", "0")
    section("audit_log", "false")
    config = RouterConfig.from_airflow_conf()
    assert (config.reload_interval, config.history_days, config.audit_log) == (7.5, 0, False)
    assert not config.history_enabled


def test_wrong_type_names_the_option(section, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    section("policy_file", str(policy))
    section("history_min_runs", "three")
    with pytest.raises(AirflowConfigException, match="history_min_runs"):
        RouterConfig.from_airflow_conf()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("reload_interval", 0, r"\[hybrid_router\] reload_interval must be > 0"),
        ("history_days", -1, r"history_days must be >= 0"),
        ("history_cache_ttl", -5, r"history_cache_ttl must be >= 0"),
        ("history_min_runs", 0, r"history_min_runs must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path, field, value, message):
    with pytest.raises(RouterConfigError, match=message):
        RouterConfig(policy_file=tmp_path, **{field: value})


def test_missing_file_at_the_default_location_uses_the_packaged_policy(tmp_path):
    path, packaged = resolve_policy_file(str(tmp_path / "hybrid_router_policy.yaml"), str(tmp_path))
    assert (path, packaged) == (DEFAULT_POLICY, True)


def test_file_at_the_default_location_wins(tmp_path):
    own = tmp_path / "hybrid_router_policy.yaml"
    own.write_text("version: 1\n")
    assert resolve_policy_file(str(own), str(tmp_path)) == (own, False)


def test_missing_file_set_explicitly_is_an_error(tmp_path):
    with pytest.raises(
        RouterConfigError, match=r"\[hybrid_router\] policy_file = .*elsewhere.yaml: no such file"
    ):
        resolve_policy_file(str(tmp_path / "elsewhere.yaml"), str(tmp_path))

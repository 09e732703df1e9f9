from __future__ import annotations

import pytest

from hybrid_router.lambda_exec.config import LambdaConfigError, LambdaExecutorConfig

REQUIRED = {"function_name": "fn", "results_queue_url": "http://q/results", "signing_secret": "s3cret"}


class FakeConf:
    def __init__(self, values: dict[str, str]):
        self.values = values

    def get(self, section: str, key: str, fallback: str | None = None) -> str | None:
        assert section == "lambda_executor"
        return self.values.get(key, fallback)


def test_reads_section_and_converts_types():
    conf = FakeConf(
        {
            **REQUIRED,
            "max_invoke_workers": "4",
            "throttle_backoff_max": "12.5",
            "check_health_on_startup": "False",
            "reserved_concurrency": "",
            "dead_letter_queue_url": "http://q/dlq",
        }
    )
    config = LambdaExecutorConfig.load(conf)
    assert config.max_invoke_workers == 4
    assert config.throttle_backoff_max == 12.5
    assert config.check_health_on_startup is False
    assert config.reserved_concurrency is None  # empty means "ask Lambda"
    assert config.dead_letter_queue_url == "http://q/dlq"
    assert config.poll_wait_seconds == 1  # default when the option is absent


def test_overrides_win_over_the_section():
    conf = FakeConf({**REQUIRED, "max_invoke_workers": "4"})
    config = LambdaExecutorConfig.load(conf, {"function_name": "big", "max_invoke_workers": 2})
    assert (config.function_name, config.max_invoke_workers) == ("big", 2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_invoke_workers": "many"}, "executor option 'max_invoke_workers': expected an integer"),
        ({"check_health_on_startup": "perhaps"}, "expected a boolean"),
        ({"max_invoke_workers": True}, "expected an integer"),
        ({"poll_wait_seconds": 21}, "poll_wait_seconds: SQS allows 0 to 20"),
        ({"max_payload_bytes": 2_000_000}, "max_payload_bytes: must be between"),
        ({"event_max_age_seconds": 10}, "event_max_age_seconds"),
        ({"functon_name": "typo"}, "unknown LambdaExecutor option(s) 'functon_name'"),
    ],
)
def test_bad_values_name_the_option(options, message):
    with pytest.raises(LambdaConfigError) as info:
        LambdaExecutorConfig.load(FakeConf(REQUIRED), options)
    assert message in str(info.value)


def test_bad_value_in_section_names_section_and_key():
    with pytest.raises(
        LambdaConfigError, match=r"\[lambda_executor\] throttle_backoff_max: expected a number"
    ):
        LambdaExecutorConfig.load(FakeConf({**REQUIRED, "throttle_backoff_max": "soon"}))


@pytest.mark.parametrize("missing", ["function_name", "results_queue_url", "signing_secret"])
def test_required_options(missing):
    values = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(
        LambdaConfigError, match=f"{missing} is required.*AIRFLOW__LAMBDA_EXECUTOR__{missing.upper()}"
    ):
        LambdaExecutorConfig.load(FakeConf(values))


def test_secret_never_shown():
    config = LambdaExecutorConfig.load(FakeConf(REQUIRED))
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)
    with pytest.raises(LambdaConfigError) as info:
        LambdaExecutorConfig.load(FakeConf(REQUIRED), {"signing_secret": 12345})
    assert "12345" not in str(info.value)


def test_messages_show_values_only_of_options_known_not_to_be_secret():
    with pytest.raises(LambdaConfigError) as info:
        LambdaExecutorConfig.load(FakeConf(REQUIRED), {"poll_wait_seconds": "soon"})
    assert str(info.value) == "executor option 'poll_wait_seconds': expected an integer (got 'soon')"
    # An endpoint URL can carry user:password: named, never shown.
    endpoint = "http://user:TOPSECRET@localhost:9001"
    with pytest.raises(LambdaConfigError) as info:
        LambdaExecutorConfig.load(FakeConf(REQUIRED), {"lambda_endpoint_url": [endpoint]})
    assert str(info.value) == "executor option 'lambda_endpoint_url': expected a string (got ***)"
    config = LambdaExecutorConfig.load(FakeConf({**REQUIRED, "lambda_endpoint_url": endpoint}))
    assert "TOPSECRET" not in repr(config) and "s3cret" not in repr(config)
    assert "function_name='fn'" in repr(config) and "lambda_endpoint_url=***" in repr(config)

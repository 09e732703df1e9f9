"""Policy options of executors that read a provider config section (the Amazon provider's ECS, Batch, Lambda)."""

from __future__ import annotations

import json
import traceback
from typing import Any

import pytest
from airflow.executors.base_executor import BaseExecutor, ExecutorConf
from airflow.providers.amazon.aws.executors.aws_lambda.lambda_executor import AwsLambdaExecutor
from airflow.providers.amazon.aws.executors.batch.batch_executor import AwsBatchExecutor
from airflow.providers.amazon.aws.executors.ecs.ecs_executor import AwsEcsExecutor

from hybrid_router.router.children import ChildConfigError, instantiate_child
from hybrid_router.router.provider_config import OptionsConf, provider_section, with_options

ECS_CLASS = "airflow.providers.amazon.aws.executors.ecs.ecs_executor.AwsEcsExecutor"


@pytest.fixture
def ecs_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Airflow-wide [aws_ecs_executor] settings, as airflow.cfg or the environment would give them."""
    settings = {
        "cluster": "shared-cluster",
        "task_definition": "airflow-worker",
        "container_name": "airflow-worker",
        "launch_type": "EC2",
        "region_name": "eu-west-1",
        "conn_id": "aws_test",
    }
    for key, value in settings.items():
        monkeypatch.setenv(f"AIRFLOW__AWS_ECS_EXECUTOR__{key.upper()}", value)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_TEST", json.dumps({"conn_type": "aws"}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.mark.parametrize(
    ("cls", "section", "some_key"),
    [
        (AwsEcsExecutor, "aws_ecs_executor", "task_definition"),
        (AwsBatchExecutor, "aws_batch_executor", "job_queue"),
        (AwsLambdaExecutor, "aws_lambda_executor", "function_name"),
    ],
)
def test_the_section_and_its_keys_come_from_the_providers_config_keys_module(cls, section, some_key):
    found = provider_section(cls)
    assert found is not None and found.name == section
    # Inherited keys count too: the provider's own iterator would miss them.
    assert {some_key, "conn_id", "region_name"} <= found.keys


def test_a_subclass_of_a_provider_executor_reads_the_same_section():
    class MyEcs(AwsEcsExecutor):
        pass

    assert provider_section(MyEcs).name == "aws_ecs_executor"


def test_executors_outside_the_providers_have_no_section():
    from airflow.executors.local_executor import LocalExecutor

    assert provider_section(LocalExecutor) is None


def test_two_ecs_children_of_one_class_differ_by_their_options(ecs_settings):
    standard = instantiate_child("ecs", ECS_CLASS, max_concurrency=5, options={})
    big = instantiate_child(
        "ecs_big",
        ECS_CLASS,
        max_concurrency=2,
        options={
            "task_definition": "airflow-worker-16gb",
            "launch_type": "FARGATE",
            "subnets": "subnet-1",
            "assign_public_ip": True,
            "run_task_kwargs": {"tags": [{"key": "size", "value": "16gb"}]},
        },
    )
    assert isinstance(big, AwsEcsExecutor)
    assert big.name.alias == "ecs_big" and big.name.module_path == ECS_CLASS
    assert (standard.parallelism, big.parallelism) == (5, 2)
    assert standard.run_task_kwargs["taskDefinition"] == "airflow-worker"
    assert standard.run_task_kwargs["launchType"] == "EC2"
    assert big.run_task_kwargs["taskDefinition"] == "airflow-worker-16gb"
    assert big.run_task_kwargs["launchType"] == "FARGATE"
    assert big.run_task_kwargs["networkConfiguration"]["awsvpcConfiguration"]["assignPublicIp"] == "ENABLED"
    assert big.run_task_kwargs["tags"] == [{"key": "size", "value": "16gb"}]
    # What the options leave out still comes from Airflow's configuration.
    assert big.cluster == standard.cluster == "shared-cluster"
    assert big.run_task_kwargs["cluster"] == "shared-cluster"
    # The overlay is per child: building the big one changed nothing for the class or the standard one.
    assert type(standard) is AwsEcsExecutor
    assert not isinstance(standard.conf, OptionsConf)


def test_an_unknown_key_names_the_policy_field_and_the_closest_key(ecs_settings):
    with pytest.raises(ChildConfigError) as err:
        instantiate_child("ecs_big", ECS_CLASS, max_concurrency=None, options={"task_defintion": "x"})
    message = str(err.value)
    assert message.startswith("executors.ecs_big.options.task_defintion: not a key of [aws_ecs_executor]")
    assert "did you mean 'task_definition'?" in message


def test_a_bad_value_fails_when_the_child_is_built(ecs_settings):
    with pytest.raises(
        ChildConfigError, match=r"executors\.ecs_big: .*\[aws_ecs_executor\] options .*mutually exclusive"
    ):
        instantiate_child(
            "ecs_big",
            ECS_CLASS,
            max_concurrency=None,
            options={"launch_type": "FARGATE", "capacity_provider_strategy": [{"capacityProvider": "x"}]},
        )


class _Base:
    """Stands in for Airflow's config behind the overlay; records what fell through to it."""

    team_name = "team-a"

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def get(self, section: str, key: str, fallback: Any = None, **kwargs: Any) -> Any:
        self.asked.append((section, key))
        return fallback if fallback is not None else f"base:{section}.{key}"

    getboolean = getint = getjson = has_option = get_mandatory_value = get

    def getsection(self, section: str) -> dict[str, Any]:
        return {"cluster": "base", "region_name": "eu"}


def test_the_overlay_answers_its_section_first_and_falls_back_for_everything_else():
    base = _Base()
    conf = OptionsConf(
        base,
        "aws_ecs_executor",
        {
            "cluster": "c1",
            "check_health_on_startup": "false",
            "max_run_task_attempts": 5,
            "run_task_kwargs": {"a": 1},
        },
    )
    assert conf.team_name == "team-a"
    assert conf.get("aws_ecs_executor", "cluster") == "c1"
    assert conf.get_mandatory_value("aws_ecs_executor", "cluster") == "c1"
    assert conf.getboolean("aws_ecs_executor", "check_health_on_startup") is False
    assert conf.getint("aws_ecs_executor", "max_run_task_attempts") == 5
    assert conf.get("aws_ecs_executor", "max_run_task_attempts") == "5"
    assert conf.getjson("aws_ecs_executor", "run_task_kwargs") == {"a": 1}
    assert json.loads(conf.get("aws_ecs_executor", "run_task_kwargs")) == {"a": 1}
    assert conf.has_option("aws_ecs_executor", "cluster")
    assert base.asked == []
    assert conf.get("aws_ecs_executor", "region_name", fallback="x") == "x"
    assert conf.get("core", "cluster") == "base:core.cluster"
    assert base.asked == [("aws_ecs_executor", "region_name"), ("core", "cluster")]
    assert conf.getsection("aws_ecs_executor") == {
        "cluster": "c1",
        "region_name": "eu",
        "check_health_on_startup": "false",
        "max_run_task_attempts": "5",
        "run_task_kwargs": '{"a": 1}',
    }
    assert conf.getsection("core") == {"cluster": "base", "region_name": "eu"}


def test_bad_boolean_and_integer_options_say_which_option():
    conf = OptionsConf(_Base(), "s", {"flag": "maybe", "count": "many"})
    with pytest.raises(ValueError, match="'flag' of \\[s\\] must be true or false"):
        conf.getboolean("s", "flag")
    with pytest.raises(ValueError, match="'count' of \\[s\\] must be an integer"):
        conf.getint("s", "count")


def test_a_bad_option_value_is_shown_only_for_an_option_known_not_to_be_secret():
    conf = OptionsConf(_Base(), "s", {"max_run_task_attempts": "many", "api_token": "TOPSECRET-token"})
    with pytest.raises(ValueError, match="'max_run_task_attempts' of \\[s\\] must be an integer, not 'many'"):
        conf.getint("s", "max_run_task_attempts")
    with pytest.raises(ValueError) as err:
        conf.getboolean("s", "api_token")
    assert str(err.value) == "option 'api_token' of [s] must be true or false, not ***"


def test_a_provider_executor_that_fails_to_build_names_its_section_options_but_no_secret_value(ecs_settings):
    env_secret = "TOPSECRET-db-password"
    environment = [{"name": "DB_PASSWORD", "value": env_secret}]
    with pytest.raises(ChildConfigError) as err:
        instantiate_child(
            "ecs_big",
            ECS_CLASS,
            max_concurrency=None,
            options={
                "launch_type": "FARGATE",
                "capacity_provider_strategy": [{"capacityProvider": "x"}],
                "run_task_kwargs": {"overrides": {"containerOverrides": [{"environment": environment}]}},
            },
        )
    message = str(err.value)
    assert message.startswith("executors.ecs_big: AwsEcsExecutor(")
    assert (
        "with [aws_ecs_executor] options {'launch_type': 'FARGATE', 'capacity_provider_strategy': ***, "
        "'run_task_kwargs': ***} failed:" in message
    )
    assert "mutually exclusive" in message
    assert env_secret not in "".join(traceback.format_exception(err.value))


class ReadsConfInInit(BaseExecutor):
    """Reads its setting during __init__, as the provider's executors do."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setting = self.conf.get("my_section", "setting", fallback="default")


def test_the_overlay_is_in_place_before_the_executors_own_init_reads_it():
    child_class = with_options(ReadsConfInInit, "my_section", {"setting": "from-policy"})
    child = child_class(team_name="t")
    assert child.setting == "from-policy"
    assert isinstance(child.conf, OptionsConf) and isinstance(child.conf.base, ExecutorConf)
    assert child.conf.team_name == "t"
    assert ReadsConfInInit().setting == "default"
    assert child_class.__name__ == "ReadsConfInInit" and issubclass(child_class, ReadsConfInInit)

"""Fixtures for the ECS child tests: an ECS cluster on the session's moto server, and the provider's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ecs_support import EcsAccount

from devtools.devstack import FAKE_AWS_ENV, MotoServer

CLUSTER = "airflow-tasks"
TASK_FAMILY = "airflow-worker"
CONTAINER = "airflow-worker"
CONN_ID = "ecs_moto"


def ecs_executor_settings(**overrides: str) -> dict[str, str]:
    """``[aws_ecs_executor]`` for moto: Fargate needs no container instances there, unlike EC2."""
    settings = {
        "cluster": CLUSTER,
        "task_definition": TASK_FAMILY,
        "container_name": CONTAINER,
        "launch_type": "FARGATE",
        "region_name": FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
        "conn_id": CONN_ID,
        # One RunTask attempt: a failure shows at once instead of after the provider's back-off.
        "max_run_task_attempts": "1",
        # The provider's health probe calls StopTask with a made-up id; moto answers 500 where AWS answers
        # "task was not found", so the probe can only fail here. Tests mark the connection healthy instead.
        "check_health_on_startup": "False",
    }
    settings.update(overrides)
    return settings


@pytest.fixture
def ecs_account(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> EcsAccount:
    """A fresh moto with one cluster and one task definition, and the ECS executor configured for them.

    The provider's AwsEcsExecutor takes no settings in its constructor: it reads ``[aws_ecs_executor]`` when it
    is built, so the settings go in as ``AIRFLOW__AWS_ECS_EXECUTOR__*`` variables.
    """
    moto_server.reset()
    account = EcsAccount(moto=moto_server, cluster=CLUSTER, task_family=TASK_FAMILY, container=CONTAINER)
    ecs = account.client()
    ecs.create_cluster(clusterName=CLUSTER)
    ecs.register_task_definition(
        family=TASK_FAMILY,
        networkMode="bridge",
        containerDefinitions=[{"name": CONTAINER, "image": "apache/airflow:3.3.2", "memory": 512}],
    )
    # An Airflow connection, not AWS_ENDPOINT_URL_ECS: only the executor's hook is pointed at moto.
    connection = {
        "conn_type": "aws",
        "login": FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        "password": FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "extra": {
            "region_name": FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
            "service_config": {"ecs": {"endpoint_url": moto_server.url}},
        },
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(connection))
    for key, value in ecs_executor_settings().items():
        monkeypatch.setenv(f"AIRFLOW__AWS_ECS_EXECUTOR__{key.upper()}", value)
    # The router writes a line into each task's log file; keep those in this test's folder.
    monkeypatch.setenv("AIRFLOW__LOGGING__BASE_LOG_FOLDER", str(tmp_path / "task-logs"))
    return account

"""The provider's AwsEcsExecutor as a child of the RoutingExecutor, against moto's ECS.

The router builds its children from ``examples/policy-ecs.yaml`` (lambda and local replaced by recording
executors, so only ECS does anything), and is driven directly, as the scheduler would: ``queue_workload``,
``heartbeat``, ``get_event_buffer``. What reaches ECS is captured with an event hook on the ECS executor's own
boto client, before the request is signed and sent: the exact ``RunTask`` parameters.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from airflow.executors import workloads
from airflow.providers.amazon.aws.executors.ecs.ecs_executor import AwsEcsExecutor
from airflow.utils.state import TaskInstanceState
from ecs_support import RECORDING_EXECUTOR, EcsAccount, RecordingExecutor, TaskInstanceRow

from devtools.workloads import make_workload
from hybrid_router.router import RoutingExecutor
from hybrid_router.router.children import ChildConfigError
from hybrid_router.router.external_id import split_child_id
from hybrid_router.router.policy import TaskFacts, load_policy

EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "examples" / "policy-ecs.yaml"
ECS_CLASS = "airflow.providers.amazon.aws.executors.ecs.ecs_executor.AwsEcsExecutor"
# The command the ECS executor puts in the container override: the Task SDK runs the workload given as JSON.
WORKLOAD_COMMAND_PREFIX = ["python", "-m", "airflow.sdk.execution_time.execute_workload", "--json-string"]


class RunTaskRecorder:
    """A ``provide-client-params.ecs.RunTask`` hook: keeps a copy of the parameters of every RunTask call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, params: dict[str, Any], **kwargs: Any) -> None:
        self.calls.append(copy.deepcopy(params))

    def workload_of(self, call: dict[str, Any], container: str) -> workloads.ExecuteTask:
        """The workload in a call's command, checking that the command is the Task SDK's."""
        (override,) = [o for o in call["overrides"]["containerOverrides"] if o["name"] == container]
        command = override["command"]
        assert command[:-1] == WORKLOAD_COMMAND_PREFIX
        return workloads.ExecuteTask.model_validate_json(command[-1])


def policy_with_ecs_only(tmp_path: Path, ecs_entry: dict[str, Any] | None = None) -> Path:
    """The example policy, with its non-ECS executors replaced by recording ones (same names, same limits)."""
    document = yaml.safe_load(EXAMPLE_POLICY.read_text())
    for name, entry in document["executors"].items():
        if name == "ecs":
            if ecs_entry is not None:
                entry.update(ecs_entry)
            continue
        entry["class"] = RECORDING_EXECUTOR
        entry.pop("options", None)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def start_router(policy_file: Path) -> tuple[RoutingExecutor, RunTaskRecorder]:
    router = RoutingExecutor(policy=load_policy(policy_file))
    router.start()
    ecs = router.children["ecs"].executor
    assert isinstance(ecs, AwsEcsExecutor)
    # check_health_on_startup is off (moto cannot pass the probe), which leaves the executor "unhealthy" and
    # about to rebuild its client and probe again before any RunTask. Say what the probe would have said on AWS.
    ecs.IS_BOTO_CONNECTION_HEALTHY = True
    recorder = RunTaskRecorder()
    ecs.ecs.meta.events.register("provide-client-params.ecs.RunTask", recorder)
    return router, recorder


def events_after_heartbeat(router: RoutingExecutor) -> dict[Any, Any]:
    router.heartbeat()
    return router.get_event_buffer()


@pytest.fixture
def router(
    ecs_account: EcsAccount, tmp_path: Path, audit_rows: list[Any]
) -> tuple[RoutingExecutor, RunTaskRecorder]:
    # Never end() the router here: AwsEcsExecutor.end() waits for its ECS tasks to stop, and moto's never do.
    return start_router(policy_with_ecs_only(tmp_path))


def test_task_routed_to_ecs_runs_with_its_overrides_and_without_router_keys(
    router: tuple[RoutingExecutor, RunTaskRecorder], ecs_account: EcsAccount, audit_rows: list[Any]
) -> None:
    executor, recorder = router
    user_ecs_config = {
        "overrides": {"containerOverrides": [{"name": ecs_account.container, "memory": 4096}]},
        "tags": [{"key": "cost-centre", "value": "analytics"}],
        "startedBy": "nightly-report",
    }
    # 4 GB is more than the "short and small" rule allows, so the example policy's "long or big" rule takes it.
    workload = make_workload(
        "build_report", executor_config={"hybrid_router": {"memory_mb": 4096}, **user_ecs_config}
    )

    executor.queue_workload(workload, session=None)
    events = events_after_heartbeat(executor)

    assert len(recorder.calls) == 1
    params = recorder.calls[0]
    assert "hybrid_router" not in json.dumps(params)
    assert params["taskDefinition"] == ecs_account.task_family
    assert params["cluster"] == ecs_account.cluster
    assert params["launchType"] == "FARGATE"
    assert params["count"] == 1
    assert params["tags"] == user_ecs_config["tags"]
    assert params["startedBy"] == "nightly-report"
    (override,) = params["overrides"]["containerOverrides"]
    assert override["name"] == ecs_account.container
    assert override["memory"] == 4096
    assert {"name": "AIRFLOW_IS_EXECUTOR_CONTAINER", "value": "true"} in override["environment"]
    sent = recorder.workload_of(params, ecs_account.container)
    assert (sent.ti.id, sent.ti.key, sent.token) == (workload.ti.id, workload.ti.key, workload.token)

    # ECS started it, and the scheduler hears of it under the router's name for the child and the task's ARN.
    state, info = events[workload.ti.key]
    assert state == TaskInstanceState.RUNNING
    child_name, task_arn = split_child_id(info)
    assert child_name == "ecs"
    (described,) = ecs_account.client().describe_tasks(cluster=ecs_account.cluster, tasks=[task_arn])["tasks"]
    assert described["startedBy"] == "nightly-report"
    assert described["overrides"]["containerOverrides"][0]["memory"] == 4096
    assert executor.children["ecs"].in_flight == {workload.ti.key}

    (row,) = audit_rows
    assert row.event == "hybrid_router.routed"
    assert json.loads(row.extra)["executor"] == "ecs"
    assert json.loads(row.extra)["rule"] == "long or big"


def test_tasks_routed_elsewhere_never_reach_run_task(
    router: tuple[RoutingExecutor, RunTaskRecorder], ecs_account: EcsAccount
) -> None:
    executor, recorder = router
    short = make_workload("short_small", executor_config={"hybrid_router": {"expected_duration": "2m"}})
    beside_scheduler = make_workload("read_local_file", queue="local")
    pinned = make_workload("needs_container", queue="ecs")

    for workload in (short, beside_scheduler, pinned):
        executor.queue_workload(workload, session=None)
    events = events_after_heartbeat(executor)

    # Only the task pinned to ECS reached RunTask; the hook was live for the whole heartbeat.
    assert [recorder.workload_of(call, ecs_account.container).ti.id for call in recorder.calls] == [
        pinned.ti.id
    ]
    lambda_child = executor.children["lambda"].executor
    local_child = executor.children["local"].executor
    assert isinstance(lambda_child, RecordingExecutor) and isinstance(local_child, RecordingExecutor)
    assert [w.ti.id for w in lambda_child.dispatched] == [short.ti.id]
    assert [w.ti.id for w in local_child.dispatched] == [beside_scheduler.ti.id]
    # Children never see the router's own section of executor_config.
    assert lambda_child.dispatched[0].ti.executor_config == {}
    assert {key: split_child_id(info)[0] for key, (_, info) in events.items()} == {
        short.ti.key: "lambda",
        beside_scheduler.ti.key: "local",
        pinned.ti.key: "ecs",
    }
    (task_arn,) = ecs_account.client().list_tasks(cluster=ecs_account.cluster)["taskArns"]
    assert events[pinned.ti.key][1] == f"ecs@1|{task_arn}"


def test_ecs_task_that_stops_without_starting_fails_the_try_through_the_router(
    router: tuple[RoutingExecutor, RunTaskRecorder], ecs_account: EcsAccount
) -> None:
    executor, recorder = router
    workload = make_workload("never_placed", queue="ecs")
    executor.queue_workload(workload, session=None)
    state, info = events_after_heartbeat(executor)[workload.ti.key]
    assert state == TaskInstanceState.RUNNING
    task_arn = info.partition("|")[2]

    # What ECS does to a task it cannot place: stops it before it ever started.
    ecs_account.client().stop_task(cluster=ecs_account.cluster, task=task_arn, reason="no capacity")
    events = events_after_heartbeat(executor)

    assert events[workload.ti.key][0] == TaskInstanceState.FAILED
    assert executor.children["ecs"].in_flight == set()
    assert workload.ti.key not in executor.running
    # max_run_task_attempts=1: the provider did not start the task again.
    assert len(recorder.calls) == 1


def test_executor_config_that_ecs_rejects_fails_only_that_task(
    router: tuple[RoutingExecutor, RunTaskRecorder], ecs_account: EcsAccount
) -> None:
    executor, recorder = router
    # A key RunTask does not have: botocore refuses it before sending, and the provider fails the task.
    bad = make_workload("bad_config", queue="ecs", executor_config={"cpuCredits": 3})
    good = make_workload("good_config", queue="ecs")
    executor.queue_workload(bad, session=None)
    executor.queue_workload(good, session=None)
    events = events_after_heartbeat(executor)

    assert events[bad.ti.key][0] == TaskInstanceState.FAILED
    assert events[good.ti.key][0] == TaskInstanceState.RUNNING
    # The hook sees both calls (it runs before botocore validates); only the good one reached ECS.
    assert [recorder.workload_of(call, ecs_account.container).ti.id for call in recorder.calls] == [
        bad.ti.id,
        good.ti.id,
    ]
    assert recorder.calls[0]["cpuCredits"] == 3
    (task_arn,) = ecs_account.client().list_tasks(cluster=ecs_account.cluster)["taskArns"]
    assert events[good.ti.key][1] == f"ecs@1|{task_arn}"
    # The failed task is the router's no more; the good one still runs there.
    assert executor.children["ecs"].in_flight == {good.ti.key}
    assert bad.ti.key not in executor.running


def test_restarted_router_hands_its_ecs_task_back_to_a_new_ecs_child(
    router: tuple[RoutingExecutor, RunTaskRecorder], ecs_account: EcsAccount, tmp_path: Path
) -> None:
    first, _ = router
    workload = make_workload("survives_restart", queue="ecs")
    first.queue_workload(workload, session=None)
    _, external_executor_id = events_after_heartbeat(first)[workload.ti.key]
    task_arn = external_executor_id.partition("|")[2]
    # The scheduler dies here; its successor builds a new router, with new children, from the same policy.
    second, recorder = start_router(policy_with_ecs_only(tmp_path / "after-restart"))
    running_on_ecs = TaskInstanceRow.of(workload, external_executor_id)
    lost = TaskInstanceRow.of(
        make_workload("unknown_arn", queue="ecs"), "ecs|" + task_arn.replace("/", "/x", 1)
    )
    never_routed = TaskInstanceRow.of(make_workload("from_another_executor"), "some-celery-id")

    not_adopted = second.try_adopt_task_instances([running_on_ecs, lost, never_routed])

    assert sorted(ti.task_id for ti in not_adopted) == ["from_another_executor", "unknown_arn"]
    # The router hands each child the child's own id and gives every row back its full id afterwards.
    assert running_on_ecs.external_executor_id == external_executor_id
    assert lost.external_executor_id.startswith("ecs|arn:")
    assert second.has_task(running_on_ecs)
    ecs_child = second.children["ecs"]
    assert ecs_child.in_flight == {workload.ti.key}
    assert ecs_child.executor.active_workers.get_all_arns() == [task_arn]

    # The adopted task is followed on ECS by the new child: its end reaches the scheduler through the router.
    ecs_account.client().stop_task(cluster=ecs_account.cluster, task=task_arn, reason="spot interruption")
    events = events_after_heartbeat(second)
    assert events[workload.ti.key][0] == TaskInstanceState.FAILED
    assert not second.has_task(running_on_ecs)
    assert recorder.calls == []


def test_example_policy_routes_by_queue_size_and_duration() -> None:
    policy = load_policy(EXAMPLE_POLICY)
    assert policy.executors["ecs"].class_path == ECS_CLASS
    assert policy.executors["ecs"].options == {}

    def decide(**facts: Any) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        decision = policy.decide(
            TaskFacts(
                dag_id="d",
                task_id="t",
                expected_duration_s=facts.pop("duration_s", 60.0),
                memory_mb=facts.pop("memory_mb", 512),
                **facts,
            )
        )
        return decision.executor, decision.overflow, decision.fallback

    assert decide() == ("lambda", ("ecs", "local"), ("ecs", "local"))
    assert decide(memory_mb=4096) == ("ecs", ("local",), ())
    assert decide(duration_s=3600.0) == ("ecs", ("local",), ())
    assert decide(queue="ecs") == ("ecs", ("local",), ())
    assert decide(queue="local", duration_s=3600.0) == ("local", (), ())


def test_ecs_option_the_executor_does_not_know_is_refused_at_start(
    ecs_account: EcsAccount, tmp_path: Path
) -> None:
    policy_file = policy_with_ecs_only(tmp_path, {"options": {"no_such_setting": "x"}})
    router = RoutingExecutor(policy=load_policy(policy_file))

    with pytest.raises(ChildConfigError, match=r"executors\.ecs.*no_such_setting"):
        router.start()


def test_ecs_options_in_the_policy_configure_that_child(
    ecs_account: EcsAccount, tmp_path: Path, audit_rows: list[Any]
) -> None:
    big_family = "airflow-worker-16gb"
    ecs_account.client().register_task_definition(
        family=big_family,
        networkMode="bridge",
        containerDefinitions=[
            {"name": ecs_account.container, "image": "apache/airflow:3.3.2", "memory": 16384}
        ],
    )
    policy_file = policy_with_ecs_only(tmp_path, {"options": {"task_definition": big_family}})
    executor, recorder = start_router(policy_file)
    workload = make_workload("big", queue="ecs")

    executor.queue_workload(workload, session=None)
    executor.heartbeat()

    (params,) = recorder.calls
    assert params["taskDefinition"] == big_family

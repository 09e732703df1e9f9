"""Option values in the router's errors, logs and task-log view: names shown, secret values never.

The rule (``hybrid_router.redaction``): a message names any option but shows a value only for an option known
not to be secret (``function_name``, ``region_name``, a concurrency...); text the router did not write (an
exception from a child) has the child's other option values replaced by ``***`` before it is logged or shown.
"""

from __future__ import annotations

import json
import logging
import traceback
from types import SimpleNamespace

import pytest
from router_fakes import FakeChild

from devtools.workloads import make_workload
from hybrid_router.redaction import MASK, scrub, secret_values, shown_options
from hybrid_router.router.children import ChildConfigError, build_children, instantiate_child
from hybrid_router.router.executor import RoutingExecutor
from hybrid_router.router.policy import load_policy

SECRET = "TOPSECRET-hmac-key"
LAMBDA = "hybrid_router.lambda_exec.LambdaExecutor"


def everything_printed(err: BaseException) -> str:
    """What a log line with this exception's traceback shows, its causes and contexts included."""
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


class LeakyChild(FakeChild):
    """A third-party child whose errors quote its ``api_token`` option, as constructors and clients can."""

    def __init__(self, *args, api_token: str = "", fail_init: bool = False, **kwargs) -> None:
        if fail_init:
            raise RuntimeError(f"cannot log in with {api_token.strip()!r}")
        super().__init__(*args, **kwargs)
        self.api_token = api_token

    def heartbeat(self) -> None:
        raise ConnectionError(f"token {self.api_token.strip()} rejected")

    def queue_workload(self, workload, session) -> None:
        raise ValueError(f"refused: credentials {self.api_token!r} are for another account")

    def get_task_log(self, ti, try_number):
        raise PermissionError(f"no log access with {self.api_token}")


# -- the helper ------------------------------------------------------------------------------------------------


def test_only_values_of_options_known_not_to_be_secret_are_shown():
    shown = shown_options(
        {"function_name": "f", "region_name": "eu-west-1", "signing_secret": SECRET, "x": 3}
    )
    assert (
        shown
        == f"{{'function_name': 'f', 'region_name': 'eu-west-1', 'signing_secret': {MASK}, 'x': {MASK}}}"
    )


def test_secret_values_cover_nested_stripped_and_escaped_forms_but_not_short_harmless_ones():
    db_password = "pw\\q-1234"  # a backslash: escaped in a repr or JSON of the options
    options = {
        "function_name": "airflow-task",  # known not to be secret: left in place
        "signing_secret": f"  {SECRET}\n",
        "run_task_kwargs": {"overrides": {"environment": [{"name": "DB_PASSWORD", "value": db_password}]}},
        "launch_type": "EC2",  # short and under a harmless name: masking it would garble text, hide nothing
        "api_key": "k1",  # short, but under a secret-looking name
    }
    values = secret_values(options)
    assert "airflow-task" not in values and "EC2" not in values
    assert {SECRET, f"  {SECRET}\n", f"  {SECRET}\\n", db_password, "k1"} <= values
    text = (
        f"bad {SECRET!r} for airflow-task on EC2, raw {options['signing_secret']!r}, "
        f"env {options['run_task_kwargs']}, json {json.dumps(options['run_task_kwargs'])}, key=k1"
    )
    scrubbed = scrub(text, values)
    assert SECRET not in scrubbed and "k1" not in scrubbed and "q-1234" not in scrubbed
    assert "airflow-task on EC2" in scrubbed


# -- building a child ------------------------------------------------------------------------------------------


def test_a_child_config_error_names_the_options_and_shows_no_secret_value():
    with pytest.raises(ChildConfigError) as info:
        instantiate_child(
            "lambda",
            LAMBDA,
            max_concurrency=5,
            options={"function_name": "airflow-task", "signing_secret": SECRET, "poll_wait_second": 1},
        )
    message = str(info.value)
    assert message.startswith("executors.lambda: LambdaExecutor(")
    assert "'function_name': 'airflow-task'" in message and f"'signing_secret': {MASK}" in message
    assert "unknown LambdaExecutor option(s) 'poll_wait_second'" in message
    assert SECRET not in everything_printed(info.value)


def test_any_constructor_error_becomes_a_child_config_error_with_option_values_scrubbed_from_its_text():
    with pytest.raises(ChildConfigError) as info:
        instantiate_child(
            "leaky",
            f"{__name__}.LeakyChild",
            max_concurrency=None,
            options={"api_token": f" {SECRET}\n", "fail_init": True},
        )
    message = str(info.value)
    assert message.startswith("executors.leaky: LeakyChild(")
    assert f"failed: RuntimeError: cannot log in with '{MASK}'" in message
    assert info.value.__cause__ is None  # a chained cause would print the unscrubbed text in a traceback
    assert SECRET not in everything_printed(info.value)


# -- the router's log lines and the task-log view -----------------------------------------------------------------


def test_the_task_log_view_of_a_child_that_cannot_be_built_shows_no_secret(write_policy, caplog):
    policy = load_policy(
        write_policy(
            f"""
            version: 1
            executors:
              lambda:
                class: {LAMBDA}
                options: {{function_name: airflow-task, signing_secret: {SECRET}, poll_wait_second: 1}}
              local: {{class: LocalExecutor}}
            defaults: {{run_on: local}}
            rules:
              - {{name: q, if: {{queue: lambda}}, run_on: lambda}}
              - {{name: rest, run_on: local}}
            """
        )
    )
    router = RoutingExecutor(policy=policy)  # as the API server builds it: never started
    caplog.set_level(logging.DEBUG)
    ti = SimpleNamespace(external_executor_id="lambda|lambda:airflow-task:req-1:d1", key=None)

    sources, lines = router.get_task_log(ti, 1)

    assert sources == [] and len(lines) == 1
    assert lines[0].startswith("hybrid_router: executor 'lambda' could not read its log: executors.lambda:")
    assert "poll_wait_second" in lines[0] and f"'signing_secret': {MASK}" in lines[0]
    assert SECRET not in lines[0]
    assert "Reading the log of" in caplog.text and SECRET not in caplog.text
    assert repr(policy.executors["lambda"]).count(SECRET) == 0  # nor through the policy's repr


@pytest.fixture
def leaky_router(write_policy, audit_rows, task_log_folder) -> RoutingExecutor:
    policy = load_policy(
        write_policy(
            f"""
            version: 1
            executors:
              leaky: {{class: {__name__}.LeakyChild, options: {{api_token: " {SECRET}\\n"}}}}
            defaults: {{expected_duration: 1m, memory_mb: 512, run_on: leaky}}
            rules:
              - {{name: all, run_on: leaky}}
            """
        )
    )
    router = RoutingExecutor(policy=policy)
    router.start()
    return router


def test_a_childs_failures_are_logged_and_shown_with_its_secret_option_values_scrubbed(leaky_router, caplog):
    caplog.set_level(logging.DEBUG)
    workload = make_workload("t")
    leaky_router.queue_workload(workload, session=None)

    leaky_router.heartbeat()  # the child refuses the task, then its own heartbeat fails

    assert "Heartbeat of child executor leaky failed: Traceback" in caplog.text
    assert f"ConnectionError: token {MASK} rejected" in caplog.text
    assert f"Child executor leaky refused {workload.ti.key}" in caplog.text
    state, info = leaky_router.get_event_buffer()[workload.ti.key]
    assert state == "failed" and f"refused the task: refused: credentials '{MASK}' are for another" in info
    ti = SimpleNamespace(task_id="t", external_executor_id="leaky@1|run-1")
    assert leaky_router.get_task_log(ti, 1) == (
        [],
        [f"hybrid_router: executor 'leaky' could not read its log: no log access with {MASK}"],
    )
    assert SECRET not in caplog.text
    assert all(record.exc_info is None for record in caplog.records)  # a traceback would be unscrubbed


def test_build_children_scrubs_a_start_error_of_the_stripped_secret_too(caplog, counters):
    spec = SimpleNamespace(
        class_path="router_fakes.UnstartableChild",
        max_concurrency=1,
        options={"failures": 1, "secret": f"{SECRET}\n"},
    )
    child = build_children({"lam": spec})["lam"]
    child.executor.secret = SECRET  # the child strips what it was given, as the Lambda executor does
    assert child.start(now=0.0) is False
    assert SECRET not in child.start_failure.error and f"token of {MASK} expired" in caplog.text
    assert SECRET not in caplog.text

"""Provider metadata that Airflow reads through the ``apache_airflow_provider`` entry point.

Airflow calls ``get_provider_info()`` in every process that touches its configuration or CLI, and an
exception or a dict that fails ``provider_info.schema.json`` breaks all of Airflow. So this module imports
nothing but the standard library, builds plain literals, and is validated against Airflow's schema in the
test suite.

Every default is a string (as in Airflow's own providers): the schema rejects Python booleans, and Airflow
parses the string with the option's declared ``type`` when the value is read.
"""

from __future__ import annotations

import copy
from typing import Any

PACKAGE_NAME = "airflow-hybrid-router"
VERSION_ADDED = "0.1.0"


def _option(
    description: str,
    type_: str,
    default: str | None,
    example: str | None = None,
    *,
    sensitive: bool = False,
) -> dict[str, Any]:
    option: dict[str, Any] = {
        "description": description,
        "version_added": VERSION_ADDED,
        "type": type_,
        "example": example if example is not None else default,
        "default": default,
    }
    if sensitive:
        option["sensitive"] = True
    return option


ROUTER_OPTIONS: dict[str, dict[str, Any]] = {
    "policy_file": _option(
        "Path of the YAML routing policy. When this option is left at its default and no file exists there, "
        "the policy shipped with the package (hybrid_router/policies/default.yaml) is used. A path "
        "set explicitly must exist: the router refuses to start rather than route by a policy you "
        "did not choose.\n",
        "string",
        "{AIRFLOW_HOME}/hybrid_router_policy.yaml",
        "/opt/airflow/config/routing.yaml",
    ),
    "reload_interval": _option(
        "Seconds between checks of the policy file for changes. A changed file that fails validation is "
        "reported and the last good policy stays in force.\n",
        "float",
        "30",
    ),
    "history_days": _option(
        "How many days of successful task runs the router looks back over to estimate a task's duration "
        "(the 95th percentile of its worker time) and its measured memory (the peaks and out-of-memory "
        "deaths the router learns from). 0 disables both: durations and memory needs then come only from "
        "the task and the policy.\n",
        "integer",
        "14",
    ),
    "history_cache_ttl": _option(
        "Seconds the duration history read from the metadata database is reused before it is read again. "
        "One query reads the history of all tasks at once.\n",
        "float",
        "300",
    ),
    "history_min_runs": _option(
        "Fewest successful runs a task needs in the look-back window before its history is trusted; with "
        "fewer, the policy's default duration applies.\n",
        "integer",
        "3",
    ),
    "audit_log": _option(
        "Whether the router writes a row to Airflow's audit log (the ``log`` table) for each routing "
        "decision, overflow and fallback. The row of what each run used (``hybrid_router.run_finished``) is "
        "written either way: the router learns from it. Without the decision rows, ``simulate`` cannot "
        "measure each executor's start latency and uses its documented defaults.\n",
        "boolean",
        "True",
    ),
    "live_state_interval": _option(
        "Seconds between writes of the router's live figures (tasks in flight and waiting per executor) to "
        "its row of the hybrid_router_live_state table, which the Routing page shows. 0 turns them off.\n",
        "float",
        "1",
    ),
}

LAMBDA_OPTIONS: dict[str, dict[str, Any]] = {
    "function_name": _option(
        "Name or ARN of the Lambda function that runs Airflow tasks.\n", "string", "airflow-task"
    ),
    "qualifier": _option(
        "Version or alias of the function to invoke. Empty invokes $LATEST.\n", "string", "", "live"
    ),
    "results_queue_url": _option(
        "URL of the SQS queue the function's handler sends signed result messages to. Required.\n",
        "string",
        None,
        "https://sqs.us-east-1.amazonaws.com/123456789012/airflow-task-results",
    ),
    "dead_letter_queue_url": _option(
        "URL of the SQS queue configured as the function's on-failure destination or dead-letter queue. "
        "Events that Lambda gave up on (timeout, crash, out of memory after its retries) are read from it.\n",
        "string",
        None,
        "https://sqs.us-east-1.amazonaws.com/123456789012/airflow-task-dlq",
    ),
    "region_name": _option(
        "AWS region of the function and queues. Empty uses the connection's or boto3's default.\n",
        "string",
        "",
        "us-east-1",
    ),
    "lambda_endpoint_url": _option(
        "Endpoint URL for the Lambda API, e.g. a local Lambda service. Empty uses AWS.\n",
        "string",
        "",
        "http://127.0.0.1:9001",
    ),
    "sqs_endpoint_url": _option(
        "Endpoint URL for the SQS API, e.g. a local SQS server. Empty uses AWS.\n",
        "string",
        "",
        "http://127.0.0.1:9002",
    ),
    "signing_secret": _option(
        "The executor's secret for the HMAC signatures on invoke events and result messages: each event "
        "carries a key derived from it that signs that dispatch's results only, so the function never holds "
        "it. Messages with a wrong signature change no task's state; surrounding whitespace is not part of "
        "the secret. Set it through AIRFLOW__LAMBDA_EXECUTOR__SIGNING_SECRET, its _CMD or _SECRET variant, "
        "or a secrets backend.\n",
        "string",
        None,
        "",
        sensitive=True,
    ),
    "aws_conn_id": _option("Airflow connection holding the AWS credentials.\n", "string", "aws_default"),
    "max_invoke_workers": _option(
        "Threads invoking the function in parallel, so that a burst of tasks does not hold up the "
        "scheduler loop.\n",
        "integer",
        "16",
    ),
    "max_payload_bytes": _option(
        "Largest invoke event accepted, in bytes. Lambda's limit for an asynchronous invocation payload is "
        "1 MiB; a bigger event is refused before it is sent.\n",
        "integer",
        "1048576",
    ),
    "reserved_concurrency": _option(
        "How many runs of the function may be in flight at once. Empty asks Lambda for the function's "
        "reserved concurrency (and, without one, the account's unreserved concurrency).\n",
        "integer",
        "",
        "100",
    ),
    "poll_wait_seconds": _option(
        "Long-poll wait of each SQS receive on the results and dead-letter queues (0-20).\n",
        "integer",
        "1",
    ),
    "throttle_backoff_max": _option(
        "Upper bound in seconds of the jittered back-off while Lambda throttles invocations or refuses the "
        "credentials (expired, missing or invalid, or no permission to invoke). Past it, a task Lambda never "
        "accepted is an infrastructure failure (throttled or credentials): the router runs the same try "
        "elsewhere.\n",
        "float",
        "60",
    ),
    "check_health_on_startup": _option(
        "Whether the executor checks at start that the function and queues exist and are reachable.\n",
        "boolean",
        "True",
    ),
    "event_max_age_seconds": _option(
        "Oldest an invoke event may be (seconds since the executor sent it, 60-21600) when the handler picks "
        "it up; an older event is reported as expired instead of running a task with a stale token.\n",
        "integer",
        "300",
    ),
    "local_log_dir": _option(
        "Folder where the local Lambda service writes its log streams; set it to show a local run's Lambda "
        "log in the task log view. Empty with real AWS: the executor reads CloudWatch Logs.\n",
        "string",
        "",
        "/tmp/local-lambda/logs",
    ),
    "unowned_message_max_age": _option(
        "Seconds after which a result or dead letter that no executor holds is deleted from its queue (by the "
        "message's SentTimestamp). Executors share queues by owner: each scheduler's executor takes the "
        "messages of its own dispatches and releases the others at once for their owner, so no executor "
        "deletes another's message before this age. It must cover the longest time a run's owner could still "
        "adopt it: the event's max age + the function's timeout + the scheduler's orphan adoption delay "
        "(scheduler_health_check_threshold + orphaned_tasks_check_interval). The default, 6 h 30 min, covers "
        "Lambda's limits (6 h, 15 min) and 15 min of adoption.\n",
        "integer",
        "23400",
    ),
    "deadline_margin_seconds": _option(
        "Seconds before the function's timeout at which the handler stops the task and reports a timeout "
        "itself, so the fallback starts at once.\n",
        "float",
        "5",
    ),
    "run_heartbeat_seconds": _option(
        "How often a running task's Lambda run sends its STARTED message again (one SQS message each). A run "
        "that could send none for three of these stops its task itself, so a run whose heartbeat stops while "
        "the results queue is read is known to be dead (its sandbox crashed, was killed or froze) and its try "
        "goes to the fallback then, not after the function's timeout. 0: no heartbeats. From 2 to 300.\n",
        "float",
        "30",
    ),
}


def get_provider_info() -> dict[str, Any]:
    """Return the provider metadata Airflow validates against ``provider_info.schema.json``."""
    return {
        "package-name": PACKAGE_NAME,
        "name": "Hybrid Router",
        "description": "Routes each Airflow task to AWS Lambda or another executor by policy, "
        "with overflow and fallback.",
        "config": {
            "hybrid_router": {
                "description": "Settings of hybrid_router.router.RoutingExecutor.\n",
                "options": copy.deepcopy(ROUTER_OPTIONS),
            },
            "lambda_executor": {
                "description": "Settings of hybrid_router.lambda_exec.LambdaExecutor. A policy file can "
                "override them per child executor under ``options``.\n",
                "options": copy.deepcopy(LAMBDA_OPTIONS),
            },
        },
        "cli": ["hybrid_router.router.cli.get_cli_commands"],
    }

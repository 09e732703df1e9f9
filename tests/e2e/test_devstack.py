"""The harness that the demo and the end-to-end tests stand on: a real Airflow on loopback runs a DAG."""

from __future__ import annotations

import textwrap

import pytest

from devtools.devstack import AirflowStack, MotoServer

pytestmark = pytest.mark.e2e


def test_airflow_stack_runs_a_dag_with_local_executor(tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "hello.py").write_text(
        textwrap.dedent(
            """
            import pendulum
            from airflow.sdk import dag, task

            @dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False)
            def devstack_hello():
                @task
                def produce():
                    return 41

                @task
                def consume(x):
                    print("consumed", x + 1)

                consume(produce())

            devstack_hello()
            """
        )
    )
    with AirflowStack(tmp_path / "airflow", dags) as stack:
        run_id = stack.trigger("devstack_hello")
        assert stack.wait_run("devstack_hello", run_id, timeout=90) == "success"
        states = {ti["task_id"]: ti["state"] for ti in stack.task_instances("devstack_hello", run_id)}
        assert states == {"produce": "success", "consume": "success"}
        assert "consumed 42" in stack.task_log("devstack_hello", run_id, "consume")


def test_moto_server_serves_sqs(tmp_path):
    with MotoServer(log_dir=tmp_path) as moto:
        url = moto.create_queue("results")
        sqs = moto.client("sqs")
        sqs.send_message(QueueUrl=url, MessageBody="hi")
        messages = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1)["Messages"]
        assert [m["Body"] for m in messages] == ["hi"]
        moto.reset()
        assert sqs.list_queues().get("QueueUrls", []) == []


def test_airflow_stack_runs_two_schedulers_on_postgres(tmp_path, postgres_url):
    """The HA topology the production tests stand on: two schedulers share one PostgreSQL database."""
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "hello.py").write_text(
        textwrap.dedent(
            """
            import pendulum
            from airflow.sdk import dag, task

            @dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False)
            def devstack_ha():
                @task
                def work(i):
                    return i

                work.expand(i=list(range(6)))

            devstack_ha()
            """
        )
    )
    with AirflowStack(tmp_path / "airflow", dags, database_url=postgres_url, schedulers=2) as stack:
        run_id = stack.trigger("devstack_ha")
        assert stack.wait_run("devstack_ha", run_id, timeout=120) == "success"
        alive = stack.sql(
            "SELECT count(*) FROM job WHERE job_type = ? AND state = ?", ("SchedulerJob", "running")
        )
        assert alive == [(2,)]

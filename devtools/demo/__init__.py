"""``make demo``: a real Airflow routes the demo DAGs between a (local) Lambda function and the Local executor.

Run as ``python -m devtools.demo``. It starts, all on 127.0.0.1 with free ports and in a fresh
AIRFLOW_HOME under the output folder (``demo-output/`` by default):

- moto's server, with the SQS results queue and dead-letter queue the Lambda path uses;
- the local Lambda service, with the demo function (small memory, short timeout, reserved concurrency 3);
- Airflow (API server, scheduler, DAG processor on SQLite) with ``[core] executor =
  hybrid_router.router.RoutingExecutor`` and ``examples/policy.yaml`` as the routing policy.

It runs the DAGs of ``examples/dags/``, then reads what happened from Airflow itself: task instances from the REST
API, the router's audit rows (``log`` table, through the REST API's event logs) and each task's
``external_executor_id``. It prints a routing report, writes it to ``<output>/report.json``, stops every process
it started (whatever happens), and exits 1 when any task's route or final state differs from what ``EXPECTED``
(``expected.py``) declares.

One module per job:

- ``expected``: the demo function's limits, the outcome declared for each task (``EXPECTED``) and ``check``;
- ``observed``: what happened, read from Airflow (``observe``, the router's audit rows);
- ``report``: the routing report (``report.json`` and the printed table);
- ``run``: starting the servers, running the DAGs, stopping everything (``run_demo``, ``main``).
"""

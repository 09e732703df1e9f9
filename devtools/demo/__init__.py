"""``make demo``: a real Airflow routes the demo DAGs between a (local) Lambda function and the Local executor.

Run as ``python -m devtools.demo``. It starts, all on 127.0.0.1 with free ports and in a fresh
AIRFLOW_HOME under the output folder (``demo-output/`` by default):

- moto's server, with the SQS results queue and dead-letter queue the Lambda path uses;
- the local Lambda service, with the demo function (512 MB, short timeout, reserved concurrency 3) and a bigger
  one (3008 MB) for the tasks that do not fit it;
- Airflow (API server, scheduler, DAG processor on SQLite) with ``[core] executor =
  hybrid_router.router.RoutingExecutor`` and ``examples/policy.yaml`` as the routing policy. ``--postgres`` puts
  the metadata in a PostgreSQL cluster of the demo's own; ``--postgres --schedulers 2`` runs two schedulers on it,
  each with its router (Airflow's HA topology), and the report says which scheduler queued each task.

It runs the DAGs of ``examples/dags/`` (the memory hog's twice: its second run goes where the router learned it
fits), then reads what happened from Airflow itself: task instances from the REST API, the router's audit rows
(``log`` table, through the REST API's event logs) and each task's ``external_executor_id``. It prints a routing
report (per task and run: the executors it went through in order, the rule, the memory need it was routed by),
writes it to ``<output>/report.json``, prints what ``airflow hybrid-router simulate --from-db --compare`` says of
the demo's history under ``examples/policy.yaml`` and ``examples/policy-one-size.yaml`` (its HTML report in
``<output>/simulate.html``), stops every process it started (whatever happens), and exits 1 when any task's route
or final state differs from what ``EXPECTED`` (``expected.py``) declares, or the simulation fails. With
``--serve`` it keeps everything running after the report and prints the URL of Airflow's Routing page, until
Ctrl-C (or SIGTERM) stops it all.

One module per job:

- ``expected``: the demo function's limits, the outcome declared for each task (``EXPECTED``) and ``check``;
- ``observed``: what happened, read from Airflow (``observe``, the router's audit rows);
- ``report``: the routing report (``report.json`` and the printed table);
- ``run``: starting the servers, running the DAGs, stopping everything (``run_demo``, ``main``).
"""

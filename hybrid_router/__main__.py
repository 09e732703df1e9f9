"""``python -m hybrid_router``: the ``airflow hybrid-router`` commands without Airflow's CLI start-up."""

from hybrid_router.router.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

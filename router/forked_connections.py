"""The scheduler's database connections must not outlive it in the processes it forks.

A process forked from the scheduler keeps a copy of every socket open at fork time: a LocalExecutor child's
workers (and the task processes they fork), a KubernetesExecutor child's watcher, and the log server that
``airflow scheduler`` forks before any executor starts. Airflow's own at-fork hook makes the copies unused, not
closed. So when the scheduler's main process is killed in the middle of a transaction (the OOM killer picks the
biggest process), PostgreSQL sees no disconnect while a copy lives: the session stays "idle in transaction" and
keeps its row locks. A new scheduler then skips the locked DAG runs (its queries skip locked rows) for as long as
the orphaned workers live, which for an idle LocalExecutor worker is for ever.

Closing the pool's connections once a child has forked its processes ends the sessions those copies share (their
sockets are dead from then on); every connection opened afterwards belongs to the scheduler alone.
"""

from __future__ import annotations


def close_connections_shared_with_forks() -> None:
    """Close the pooled connections to Airflow's metadata database that are not in use.

    Call it in the scheduler after starting something that forks. A connection in use now is left alone: it is
    never handed out again.
    """
    from airflow import settings

    if settings.engine is not None:
        settings.engine.dispose()

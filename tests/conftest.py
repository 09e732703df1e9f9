"""Test-session set-up shared by every test folder.

Airflow reads AIRFLOW_HOME when it is first imported, so it is pointed at a fresh folder here, before any test
imports Airflow: tests never read or write a developer's own Airflow home or database.
"""

from __future__ import annotations

import os
import tempfile

_home = tempfile.mkdtemp(prefix="hybrid-router-tests-")
os.environ["AIRFLOW_HOME"] = _home
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home}/airflow.db"

"""airflow-hybrid-router: route each Airflow task to Lambda or another executor by policy."""

__version__ = "0.1.0"

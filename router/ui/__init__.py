"""The Routing page in Airflow's UI: a plugin the provider registers (``plugin.py``), its JSON endpoints
(``api.py``), the reads behind them (``queries.py``) and the page itself (``static/``)."""

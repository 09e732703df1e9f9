"""The URL table: which Lambda REST path (as botocore builds it) goes to which API method.

Paths come from botocore's service model for Lambda (``requestUri`` of each operation); the function name
segment is URL-encoded by botocore (an ARN's ``:`` arrives as ``%3A``) and decoded by the adapter.
"""

from __future__ import annotations

import re

_FN = r"(?P<function_name>[^/]+)"

# (HTTP method, path pattern, method name of app.LambdaApi)
URL_TABLE: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in (
        ("GET", r"^/2015-03-31/functions/?$", "list_functions"),
        ("POST", r"^/2015-03-31/functions/?$", "create_function"),
        ("GET", rf"^/2015-03-31/functions/{_FN}/?$", "get_function"),
        ("DELETE", rf"^/2015-03-31/functions/{_FN}/?$", "delete_function"),
        ("GET", rf"^/2015-03-31/functions/{_FN}/configuration/?$", "get_function_configuration"),
        ("POST", rf"^/2015-03-31/functions/{_FN}/invocations/?$", "invoke"),
        ("PUT", rf"^/2017-10-31/functions/{_FN}/concurrency/?$", "put_function_concurrency"),
        ("DELETE", rf"^/2017-10-31/functions/{_FN}/concurrency/?$", "delete_function_concurrency"),
        ("GET", rf"^/2019-09-30/functions/{_FN}/concurrency/?$", "get_function_concurrency"),
        ("PUT", rf"^/2019-09-25/functions/{_FN}/event-invoke-config/?$", "put_function_event_invoke_config"),
        (
            "POST",
            rf"^/2019-09-25/functions/{_FN}/event-invoke-config/?$",
            "update_function_event_invoke_config",
        ),
        ("GET", rf"^/2019-09-25/functions/{_FN}/event-invoke-config/?$", "get_function_event_invoke_config"),
        # Local only: not part of AWS's API.
        ("GET", r"^/_local/health$", "health"),
        ("GET", r"^/_local/stats$", "stats"),
        ("POST", r"^/_local/faults$", "set_faults"),
    )
]

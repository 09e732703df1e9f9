"""A Lambda function's concurrency as a limit that every scheduler shares.

A function's concurrency (its reserved concurrency, or ``[lambda_executor] reserved_concurrency``) is one pool
for the account: the executors of every scheduler that invoke the function draw on it, and Lambda does not refuse
an async invoke past it but queues the event. The executor describes that pool to its router
(``child_protocol.SharedConcurrency``): its key, its limit and how to recognise the function's runs in the metadata
database by their external id; the router counts every scheduler's runs against it (docs/tuning.md).
"""

from __future__ import annotations

from hybrid_router.child_protocol import SharedConcurrency, like_literal
from hybrid_router.lambda_exec.external_id import PREFIX


def pool_key(function_name: str) -> str:
    """One pool per function: versions and aliases share the function's reserved concurrency."""
    return f"{PREFIX}{function_name}"


def shared_concurrency(function_name: str, limit: int | None) -> SharedConcurrency | None:
    """The pool of ``function_name`` with ``limit`` runs at once; None for a function without a known limit."""
    if limit is None:
        return None
    # The id is `lambda:<function>:...` alone, or after a router's `<child>@<try>|`.
    runs = f"%{like_literal(f'{PREFIX}{function_name}:')}%"
    return SharedConcurrency(key=pool_key(function_name), limit=limit, external_id_patterns=(runs,))

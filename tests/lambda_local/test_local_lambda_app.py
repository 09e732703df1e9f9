"""The HTTP adapter in-process: routing and AWS's error serialisation, read back by botocore's own parser."""

from __future__ import annotations

from typing import Any

import botocore.session
from botocore.parsers import RestJSONParser

from hybrid_router.lambda_exec.local import errors
from hybrid_router.lambda_exec.local.app import LambdaApi, Request, Response
from hybrid_router.lambda_exec.local.faults import Faults


class BrokenBackend:
    faults = Faults()  # none injected

    def get_function(self, name: str, qualifier: str | None) -> dict[str, Any]:
        raise RuntimeError("a bug in the service")

    def invoke_async(self, name: str, payload: bytes, qualifier: str | None) -> str:
        raise errors.TooManyRequestsException("Rate Exceeded.", reason="FunctionInvocationRateLimitExceeded")


def call(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Response:
    api = LambdaApi(BrokenBackend())  # type: ignore[arg-type]
    return api.handle(Request(method, path, {}, {k.lower(): v for k, v in (headers or {}).items()}, body))


def parse(operation: str, response: Response) -> dict[str, Any]:
    """What boto3 would make of this response."""
    model = botocore.session.get_session().get_service_model("lambda").operation_model(operation)
    raw = {
        "status_code": response.status,
        "headers": {k.lower(): v for k, v in response.headers.items()},
        "body": response.body,
    }
    return RestJSONParser().parse(raw, model.output_shape)


def test_an_internal_error_is_a_service_exception() -> None:
    response = call("GET", "/2015-03-31/functions/f")
    parsed = parse("GetFunction", response)
    assert response.status == 500
    assert parsed["Error"]["Code"] == "ServiceException"
    assert "a bug in the service" not in response.body.decode(), "internals stay in the service's log"


def test_throttling_carries_reason_and_retry_after() -> None:
    response = call("POST", "/2015-03-31/functions/f/invocations", b"{}", {"X-Amz-Invocation-Type": "Event"})
    parsed = parse("Invoke", response)
    assert response.status == 429
    assert parsed["Error"]["Code"] == "TooManyRequestsException"
    assert response.headers["Retry-After"] == "1"
    assert b'"Reason": "FunctionInvocationRateLimitExceeded"' in response.body


def test_unknown_paths_and_methods() -> None:
    assert call("GET", "/2015-03-31/layers").status == 404
    wrong_method = call("PATCH", "/2015-03-31/functions/f")
    assert wrong_method.status == 404
    assert parse("GetFunction", wrong_method)["Error"]["Code"] == "UnknownOperationException"


def test_an_unknown_invocation_type_is_a_bad_request() -> None:
    response = call("POST", "/2015-03-31/functions/f/invocations", b"{}", {"X-Amz-Invocation-Type": "Later"})
    assert response.status == 400
    assert parse("Invoke", response)["Error"]["Code"] == "InvalidParameterValueException"

"""AWS Lambda's API errors, one class each, serialised the way the service does.

botocore's rest-json parser reads the error code from the ``X-Amzn-ErrorType`` header (and ``__type`` /
``Type`` in the body), the HTTP status from the response, and the shape's members from the body, so boto3
raises a ``ClientError`` whose ``response["Error"]["Code"]`` is the class's ``code``.
"""

from __future__ import annotations

import json
from typing import Any


class LambdaApiError(Exception):
    """Base class: ``code`` is AWS's error code, ``status`` the HTTP status, ``kind`` AWS's ``Type``."""

    code = "ServiceException"
    status = 500
    kind = "Service"

    def __init__(self, message: str, **members: Any):
        super().__init__(message)
        self.message = message
        self.members = members

    def headers(self) -> dict[str, str]:
        return {"X-Amzn-ErrorType": f"{self.code}:http://internal.amazon.com/coral/com.amazonaws.awslambda/"}

    def body(self) -> bytes:
        payload = {"Type": self.kind, "message": self.message, "__type": self.code, **self.members}
        return json.dumps(payload).encode("utf-8")


class ServiceException(LambdaApiError):
    pass


class ResourceNotFoundException(LambdaApiError):
    code = "ResourceNotFoundException"
    status = 404
    kind = "User"


class ResourceConflictException(LambdaApiError):
    code = "ResourceConflictException"
    status = 409
    kind = "User"


class InvalidParameterValueException(LambdaApiError):
    code = "InvalidParameterValueException"
    status = 400
    kind = "User"


class InvalidRequestContentException(LambdaApiError):
    code = "InvalidRequestContentException"
    status = 400
    kind = "User"


class RequestTooLargeException(LambdaApiError):
    code = "RequestTooLargeException"
    status = 413
    kind = "User"


class UnsupportedOperation(LambdaApiError):
    """A path this local service does not implement (AWS answers unknown paths with a 404 of this kind)."""

    code = "UnknownOperationException"
    status = 404
    kind = "User"


class TooManyRequestsException(LambdaApiError):
    code = "TooManyRequestsException"
    status = 429
    kind = "User"

    def __init__(self, message: str, reason: str, retry_after_s: int = 1):
        super().__init__(message, Reason=reason)
        self.reason = reason
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Retry-After": str(self.retry_after_s)}


def function_not_found(name: str, region: str, account_id: str) -> ResourceNotFoundException:
    arn = f"arn:aws:lambda:{region}:{account_id}:function:{name}"
    return ResourceNotFoundException(f"Function not found: {arn}")

"""The HTTP adapter: parses Lambda REST requests, calls the model, serialises answers and errors as AWS does.

Standard library HTTP server (one thread per connection, HTTP/1.1 keep-alive for boto3's connection pool):
an invoke must cost about a millisecond of service time, and a synchronous invoke may block its thread for the
function's whole timeout.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hybrid_router.lambda_exec.local import errors
from hybrid_router.lambda_exec.local.config import ConfigError, FunctionConfig
from hybrid_router.lambda_exec.local.faults import LostAnswer
from hybrid_router.lambda_exec.local.model import LambdaBackend
from hybrid_router.lambda_exec.local.sandbox import Ending
from hybrid_router.lambda_exec.local.urls import URL_TABLE

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 4096  # X-Amz-Log-Type: Tail returns the last 4 KB of the invocation's log


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            data = json.loads(self.body)
        except ValueError:
            raise errors.InvalidRequestContentException("Could not parse request body into json") from None
        if not isinstance(data, dict):
            raise errors.InvalidRequestContentException("Request body must be a JSON object")
        return data


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(
            status, json.dumps(data).encode("utf-8"), {"Content-Type": "application/json", **(headers or {})}
        )


def function_from_api(body: Mapping[str, Any]) -> FunctionConfig:
    """A FunctionConfig from a ``CreateFunction`` request body (zip or image package)."""
    handler = body.get("Handler")
    if not handler:
        command = (body.get("ImageConfig") or {}).get("Command") or []
        handler = command[0] if command else None
    dlq = (body.get("DeadLetterConfig") or {}).get("TargetArn") or None
    values: dict[str, Any] = {
        "name": body.get("FunctionName"),
        "environment": (body.get("Environment") or {}).get("Variables") or {},
        "dead_letter_queue_url": dlq,
    }
    if handler:
        values["handler"] = handler
    if "MemorySize" in body:
        values["memory_mb"] = body["MemorySize"]
    if "Timeout" in body:
        values["timeout_s"] = body["Timeout"]
    try:
        return FunctionConfig(**values)
    except ConfigError as exc:
        raise errors.InvalidParameterValueException(str(exc)) from None


class DropConnection(Exception):
    """Answer nothing and close the connection (an injected lost answer)."""


class LambdaApi:
    """One method per operation in the URL table."""

    def __init__(self, backend: LambdaBackend):
        self.backend = backend

    def list_functions(self, req: Request) -> Response:
        return Response.json(self.backend.list_functions())

    def create_function(self, req: Request) -> Response:
        fn = function_from_api(req.json())
        return Response.json(self.backend.create_function(fn), status=201)

    def get_function(self, req: Request) -> Response:
        return Response.json(
            self.backend.get_function(req.params["function_name"], req.query.get("Qualifier"))
        )

    def get_function_configuration(self, req: Request) -> Response:
        name = req.params["function_name"]
        return Response.json(self.backend.get_function_configuration(name, req.query.get("Qualifier")))

    def delete_function(self, req: Request) -> Response:
        self.backend.delete_function(req.params["function_name"])
        return Response(204)

    def put_function_concurrency(self, req: Request) -> Response:
        reserved = req.json().get("ReservedConcurrentExecutions")
        return Response.json(self.backend.put_function_concurrency(req.params["function_name"], reserved))

    def get_function_concurrency(self, req: Request) -> Response:
        return Response.json(self.backend.get_function_concurrency(req.params["function_name"]))

    def delete_function_concurrency(self, req: Request) -> Response:
        self.backend.delete_function_concurrency(req.params["function_name"])
        return Response(204)

    def put_function_event_invoke_config(self, req: Request) -> Response:
        answer = self.backend.put_event_invoke_config(req.params["function_name"], req.json(), replace=True)
        return Response.json(answer)

    def update_function_event_invoke_config(self, req: Request) -> Response:
        answer = self.backend.put_event_invoke_config(req.params["function_name"], req.json(), replace=False)
        return Response.json(answer)

    def get_function_event_invoke_config(self, req: Request) -> Response:
        return Response.json(self.backend.get_event_invoke_config(req.params["function_name"]))

    def invoke(self, req: Request) -> Response:
        name = req.params["function_name"]
        qualifier = req.query.get("Qualifier")
        kind = req.headers.get("x-amz-invocation-type", "RequestResponse")
        if kind == "Event":
            time.sleep(self.backend.faults.invoke_delay_s())
            request_id = self.backend.invoke_async(name, req.body, qualifier)
            lost = self.backend.faults.lost_answer()
            if lost is LostAnswer.RESET:
                raise DropConnection(request_id)
            if lost is LostAnswer.SERVER_ERROR:
                raise errors.ServiceException("Internal error (the event was accepted)")
            return Response(202, headers={"x-amzn-RequestId": request_id})
        if kind == "DryRun":
            self.backend.dry_run(name, qualifier)
            return Response(204)
        if kind != "RequestResponse":
            raise errors.InvalidParameterValueException(
                f"X-Amz-Invocation-Type: expected Event, RequestResponse or DryRun, got {kind!r}"
            )
        request_id, result = self.backend.invoke_sync(name, req.body, qualifier)
        headers = {"x-amzn-RequestId": request_id, "X-Amz-Executed-Version": "$LATEST"}
        if req.headers.get("x-amz-log-type") == "Tail":
            headers["X-Amz-Log-Result"] = base64.b64encode(result.log_tail[-LOG_TAIL_BYTES:]).decode("ascii")
        if result.ending is Ending.SUCCESS:
            body = (result.payload or "null").encode("utf-8")
            return Response(200, body, {"Content-Type": "application/json", **headers})
        error = {**result.error, "requestId": request_id}
        # Lambda reports every failure of the function itself (not of the API call) as 200 + this header.
        return Response.json(error, status=200, headers={**headers, "X-Amz-Function-Error": "Unhandled"})

    def health(self, req: Request) -> Response:
        return Response.json({"status": "ok"})

    def stats(self, req: Request) -> Response:
        return Response.json(self.backend.stats())

    def set_faults(self, req: Request) -> Response:
        body = req.json()
        if not isinstance(body, dict):
            raise errors.InvalidParameterValueException("expected a JSON object")
        return Response.json(self.backend.set_delivery_faults(**body))

    # -- dispatch -----------------------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        try:
            handler_name = self._route(req)
            return getattr(self, handler_name)(req)
        except errors.LambdaApiError as exc:
            return Response(exc.status, exc.body(), {"Content-Type": "application/json", **exc.headers()})
        except DropConnection:
            raise
        except Exception:
            log.exception("Internal error on %s %s", req.method, req.path)
            exc = errors.ServiceException("The local Lambda service hit an internal error; see its log")
            return Response(exc.status, exc.body(), {"Content-Type": "application/json", **exc.headers()})

    def _route(self, req: Request) -> str:
        known_path = False
        for method, pattern, name in URL_TABLE:
            match = pattern.match(req.path)
            if match is None:
                continue
            known_path = True
            if method == req.method:
                req.params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
                return name
        if known_path:
            raise errors.UnsupportedOperation(f"{req.method} is not supported on {req.path}")
        raise errors.UnsupportedOperation(
            f"The local Lambda service does not implement {req.method} {req.path}"
        )


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 reuses its connections
    server: LambdaHTTPServer

    def _serve(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(
            method=self.command,
            path=parsed.path,
            query=dict(urllib.parse.parse_qsl(parsed.query)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        try:
            resp = self.server.api.handle(req)
        except DropConnection:
            # The caller sees its connection reset with no answer, whatever happened behind it.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(resp.status)
        headers = {"x-amzn-RequestId": str(uuid.uuid4()), **resp.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if resp.body:
            self.wfile.write(resp.body)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:
        log.warning("%s - %s", self.address_string(), format % args)


class LambdaHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # bursts of invokes from an executor's thread pool
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: LambdaApi):
        self.api = api
        super().__init__(address, _RequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(backend: LambdaBackend, host: str = "127.0.0.1", port: int = 0) -> LambdaHTTPServer:
    return LambdaHTTPServer((host, port), LambdaApi(backend))


__all__ = ["LambdaApi", "LambdaHTTPServer", "Request", "Response", "make_server"]

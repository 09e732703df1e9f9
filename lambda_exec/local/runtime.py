"""The runtime inside one local sandbox: imports the handler once, then runs invocations sent over a pipe.

This plays the part of Lambda's runtime interface client. It is started by ``sandbox.py`` as
``python -m hybrid_router.lambda_exec.local.runtime --control-in FD --control-out FD --handler module.function``
in its own process group, with the function's environment, its stdout/stderr going to the log stream's file.
Standard library only: its imports are part of every cold start.

Control protocol, one JSON object per line:

- runtime -> service, once: ``{"type": "ready", "init_ms": ...}`` or ``{"type": "init_error", "error": {...}}``
- service -> runtime: ``{"request_id", "payload" (JSON text), "deadline" (epoch seconds), "function_arn"}``
- runtime -> service: ``{"type": "result", "request_id", "payload" (JSON text)}`` or
  ``{"type": "error", "request_id", "error": {"errorMessage", "errorType", "stackTrace"}}``
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO

PARENT_WATCH_INTERVAL_S = 0.5


class LambdaContext:
    """The context object Lambda's Python runtime passes to a handler (the members handlers use)."""

    def __init__(self, request_id: str, deadline: float, function_arn: str):
        self.aws_request_id = request_id
        self.invoked_function_arn = function_arn
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")  # a string, as in AWS
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self._deadline = deadline

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.time()) * 1000))

    def __repr__(self) -> str:
        return f"LambdaContext(aws_request_id={self.aws_request_id!r}, function_name={self.function_name!r})"


class _RequestIdFilter(logging.Filter):
    """Adds the current request id to log records, as Lambda's log format shows it."""

    request_id = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.aws_request_id = self.request_id
        return True


def _configure_logging() -> _RequestIdFilter:
    request_filter = _RequestIdFilter()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(
            "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    )
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    handler.addFilter(request_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # Lambda's default; handlers raise their own loggers' levels
    return request_filter


def _error(exc: BaseException, error_type: str | None = None) -> dict[str, Any]:
    return {
        "errorMessage": str(exc),
        "errorType": error_type or type(exc).__name__,
        # Without the runtime's own frame, as Lambda shows only the handler's frames.
        "stackTrace": traceback.format_tb(exc.__traceback__)[1:],
    }


def _load_handler(path: str) -> Callable[[Any, LambdaContext], Any]:
    module_name, _, attribute = path.rpartition(".")
    module = importlib.import_module(module_name)
    function = getattr(module, attribute)
    if not callable(function):
        raise TypeError(f"Handler '{attribute}' in module '{module_name}' is not callable")
    return function


def _init_error_type(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return "Runtime.UserCodeSyntaxError"
    if isinstance(exc, ImportError):
        return "Runtime.ImportModuleError"
    if isinstance(exc, (AttributeError, TypeError)):
        return "Runtime.HandlerNotFound"
    return "Runtime.Unhandled"


def _write(out: BinaryIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode("utf-8") + b"\n")
    out.flush()


def _descendants(root_pid: int) -> list[int]:
    """Every process below ``root_pid``, from /proc (no third-party libraries in the sandbox)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _die_with_parent(parent_pid: int) -> None:
    """If the service dies without stopping us, take our process tree down instead of lingering."""
    while True:
        time.sleep(PARENT_WATCH_INTERVAL_S)
        if os.getppid() != parent_pid:
            for pid in _descendants(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os._exit(137)


def serve(control_in: BinaryIO, control_out: BinaryIO, handler_path: str) -> int:
    request_filter = _configure_logging()
    threading.Thread(target=_die_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    begin = time.perf_counter()
    try:
        function = _load_handler(handler_path)
    except Exception as exc:
        error_type = _init_error_type(exc)
        print(f"[ERROR] {error_type}: {exc}", flush=True)
        _write(control_out, {"type": "init_error", "error": _error(exc, error_type)})
        return 1
    _write(control_out, {"type": "ready", "init_ms": (time.perf_counter() - begin) * 1000})

    for line in iter(control_in.readline, b""):
        request = json.loads(line)
        request_id = request["request_id"]
        request_filter.request_id = request_id
        context = LambdaContext(request_id, request["deadline"], request.get("function_arn", ""))
        try:
            event = json.loads(request["payload"]) if request["payload"] else {}
            result = function(event, context)
        except SystemExit as exc:
            # Lambda reports a handler calling sys.exit() as the runtime exiting; so do we, and we exit.
            sys.stdout.flush()
            sys.stderr.flush()
            return exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:
            reply: dict[str, Any] = {"type": "error", "request_id": request_id, "error": _error(exc)}
        else:
            try:
                reply = {"type": "result", "request_id": request_id, "payload": json.dumps(result)}
            except (TypeError, ValueError) as exc:
                reply = {
                    "type": "error",
                    "request_id": request_id,
                    "error": _error(exc, "Runtime.MarshalError"),
                }
        finally:
            request_filter.request_id = ""
            sys.stdout.flush()
            sys.stderr.flush()
        _write(control_out, reply)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control-in", type=int, required=True)
    parser.add_argument("--control-out", type=int, required=True)
    parser.add_argument("--handler", required=True)
    args = parser.parse_args(argv)
    with os.fdopen(args.control_in, "rb") as control_in, os.fdopen(args.control_out, "wb") as control_out:
        return serve(control_in, control_out, args.handler)


if __name__ == "__main__":
    sys.exit(main())

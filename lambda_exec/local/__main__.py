"""``python -m hybrid_router.lambda_exec.local --port 0 --config functions.yaml``

Serves the Lambda API on 127.0.0.1 and prints one line ``LOCAL_LAMBDA_URL=http://127.0.0.1:PORT`` on stdout once
it accepts requests. SIGTERM or SIGINT stop it, killing every sandbox's process tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

from hybrid_router.lambda_exec.local.app import LambdaHTTPServer, make_server
from hybrid_router.lambda_exec.local.config import ConfigError, ServiceConfig, load_config
from hybrid_router.lambda_exec.local.model import LambdaBackend

log = logging.getLogger("hybrid_router.lambda_exec.local")

URL_LINE_PREFIX = "LOCAL_LAMBDA_URL="
PARENT_CHECK_INTERVAL_S = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_router.lambda_exec.local",
        description="A local stand-in for AWS Lambda, reachable by boto3 through endpoint_url.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: 0)")
    parser.add_argument("--config", help="YAML file with the functions and service settings")
    parser.add_argument("--log-dir", help="folder for the functions' log streams (overrides the file)")
    parser.add_argument("--sqs-endpoint-url", help="SQS endpoint for DLQs and sandboxes (overrides the file)")
    parser.add_argument("--log-level", default="INFO", help="the service's own log level (default: INFO)")
    parser.add_argument(
        "--parent-pid",
        type=int,
        help="stop (and stop every sandbox) when this process, the one that started us, is gone",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config) if args.config else ServiceConfig()
        overrides = {}
        if args.log_dir:
            overrides["log_dir"] = args.log_dir
        if args.sqs_endpoint_url:
            overrides["sqs_endpoint_url"] = args.sqs_endpoint_url
        config = dataclasses.replace(config, **overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    backend = LambdaBackend(config, os.environ)
    server = make_server(backend, args.host, args.port)
    backend.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("Received %s: stopping", signal.Signals(signum).name)
        # shutdown() waits for serve_forever(), which runs in this (the main) thread: call it from another.
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.parent_pid:
        threading.Thread(
            target=_stop_when_orphaned, args=(args.parent_pid, server), name="parent-watch", daemon=True
        ).start()
    log.info("Local Lambda service on %s with functions %s", server.url, [f.name for f in config.functions])
    print(f"{URL_LINE_PREFIX}{server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        backend.shutdown()
        server.server_close()
        log.info("Local Lambda service stopped")
    return 0


def _stop_when_orphaned(parent_pid: int, server: LambdaHTTPServer) -> None:
    """A test run killed hard must not leave the service and its sandboxes behind."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    log.warning("Parent process %d is gone: stopping", parent_pid)
    server.shutdown()


if __name__ == "__main__":
    sys.exit(main())

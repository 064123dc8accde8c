#!/usr/bin/env python3
"""Container health check: exit 0 only if lstm-serve's gRPC health service says SERVING.

    python scripts/healthcheck.py [--target HOST:PORT] [--service NAME] [--timeout SECONDS]

The target defaults to this container's server: 127.0.0.1 (or LSTM_SERVE_HOST when that
is a specific address) on LSTM_SERVE_PORT (50051). --service "" (the default) asks about
the server as a whole. Exit codes: 0 SERVING, 1 anything else (not serving, unknown
service, unreachable, timeout).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_target() -> str:
    host = os.environ.get("LSTM_SERVE_HOST", "").strip()
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # bare IPv6 address
    return f"{host}:{os.environ.get('LSTM_SERVE_PORT', '50051')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=default_target(), help="HOST:PORT of the gRPC server")
    parser.add_argument("--service", default="", help='service name to check ("" = the whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"unhealthy: {args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.target}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

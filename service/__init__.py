"""lstm-serve: the gRPC server, its engine, scheduler and model runner.

gRPC reads GRPC_EXPERIMENTS once, when it is first imported, so the choice below is made here,
before any module of the package imports grpc. grpcio 1.85's default socket layer (EventEngine)
hands every read and write to a pool of its own threads; the older one (iomgr, still shipped and
supported) does the I/O on the thread that polls the completion queue, which in grpc.aio is the
one beside the event loop. On 2 cores that cut gRPC's CPU per token-by-token request by ~28 %
(`lstm-bench pingpong`, 256 sessions: 0.35 -> 0.25 ms between server and load generator) and
raised served tokens/s at 256 sessions by ~12 % (docs/performance.md). A GRPC_EXPERIMENTS set
by the operator wins.
"""

import os

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
# gRPC's own log lines go straight to stderr, outside the server's logging (and its JSON
# format); grpcio 1.85 prints INFO ones by default, e.g. one per failed TLS handshake. Errors only,
# unless the operator says otherwise.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# libgomp (torch's OpenMP runtime) reads GOMP_SPINCOUNT once, when torch is imported: how long a
# thread that waits at a barrier, or for the next parallel region, spins before it sleeps. The
# default, 300,000 spins, kept the model's worker thread spinning ~9 ms after every step, on the
# core the event loop then needed to answer that step and read the next requests; 30,000 (~1 ms
# here) still covers the waits inside a step. Served, alternated (docs/performance.md, "One
# OpenMP pool"): 256 token-by-token sessions 5,690 / 5,919 -> 6,682 / 6,368 tokens/s. An operator's
# GOMP_SPINCOUNT wins.
GOMP_SPINCOUNT = "30000"

os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)

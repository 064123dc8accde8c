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

# The model's OpenMP threads are bound one per core (libgomp's OMP_PROC_BIND=close over
# OMP_PLACES=cores: the engine thread on the first core of the process's CPU set, each worker on
# the next). Unbound, the worker sleeps between steps (the spin above) and the kernel woke it at
# times on the engine thread's core while the other stood idle: ~4 % of the 64-session steps ran
# 2-3x long with both model threads queued on one core, and a lone session's turnaround waited
# on such wake-ups. Served, alternated (docs/performance.md, "Bound model threads"): p99 at 64
# token-by-token sessions 21-28 -> 14-20 ms, 8 sessions +20-30 % tokens/s. libgomp reads the
# variables when torch loads and then binds the loading thread too, so torch is loaded here and
# that thread gets its CPUs back: the event loop and gRPC's threads stay free to run anywhere.
# The variables are not left to child processes. An operator's OMP_PROC_BIND or
# GOMP_CPU_AFFINITY wins (OMP_PROC_BIND=false: no binding); where torch was loaded before this
# package, nothing is bound.
OMP_PROC_BIND = "close"
OMP_PLACES = "cores"

# The process's CPUs before anything is bound (None where the platform has no CPU affinity).
PROCESS_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def unbind_thread() -> None:
    """Give the calling thread the process's CPUs back. A thread started from the engine thread
    inherits its binding to one core: the state store's writer did, and its snapshots then ran on
    the engine thread's core while the model stepped (service/state_store.py)."""
    if PROCESS_CPUS is not None:
        try:
            os.sched_setaffinity(0, PROCESS_CPUS)
        except OSError:  # (a sandbox that refuses it: the thread stays where it was)
            pass


def _load_torch_with_bound_threads() -> str:
    """Load torch with the model's OpenMP threads bound; what applies, for the startup log."""
    import sys

    if "torch" in sys.modules:
        return "off (torch was loaded before the service package)"
    if PROCESS_CPUS is None:
        return "off (no CPU affinity on this platform)"
    chosen = "OMP_PROC_BIND" in os.environ or "GOMP_CPU_AFFINITY" in os.environ
    added = {} if chosen else {"OMP_PROC_BIND": OMP_PROC_BIND}
    if not chosen and "OMP_PLACES" not in os.environ:
        added["OMP_PLACES"] = OMP_PLACES
    os.environ.update(added)
    try:
        import torch  # noqa: F401  (libgomp reads the variables now)
    finally:
        for name in added:
            os.environ.pop(name)
        unbind_thread()  # (an operator's binding pinned this thread just the same)
    if chosen:
        return " ".join(f"{k}={os.environ[k]}" for k in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")
                        if k in os.environ) + " (set by the environment)"
    return f"OMP_PROC_BIND={OMP_PROC_BIND} OMP_PLACES={added.get('OMP_PLACES') or os.environ['OMP_PLACES']}"


OPENMP_BINDING = _load_torch_with_bound_threads()

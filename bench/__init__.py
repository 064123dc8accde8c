"""lstm-bench: load generator, offline limit and benchmark sweep for lstm-serve.

    lstm-bench load --spawn --model reference --sessions 64 --chunk 1 --duration 10
    lstm-bench load --target 127.0.0.1:50051 --mode open --rate 500 --sessions 256
    lstm-bench offline --model reference --batch 64 --chunk 1
    lstm-bench sweep [--quick]           # writes docs/benchmarks.md and docs/img/*.png

Only loopback targets are accepted: this is a tool for measuring a server on this
machine, not for loading someone else's.
"""

import service  # noqa: F401  (first: it chooses gRPC's socket layer before grpc is imported)

__version__ = "0.1.0"

#!/usr/bin/env python3
"""Bounded soak of lstm-serve: N sessions of mixed traffic for M minutes, watching memory and errors.

    python scripts/soak.py --checkpoint checkpoints/default --sessions 64 --minutes 30
    python scripts/soak.py --target 127.0.0.1:50051 --pid 1234 --minutes 10      # a server already running

Without --target it starts the server itself (`python -m service.server --port 0 --metrics-port -1
--durability none`, plus any --server-arg). Every session runs a loop of Step, StreamSteps, Generate, Fork
(+ Step + Delete of the fork), Reset and GetSession, and checks every answer's position against its own
count. Each sample it also checks one session's latest log-probabilities against an offline forward of
everything that session was fed (needs the checkpoint locally; --no-verify to skip).

Every --sample-seconds it prints a row: elapsed time, server RSS (VmRSS of /proc/PID/status), growth over
the baseline, calls and errors in the interval. The baseline is the first sample after the warm-up; the
final RSS is the median of the last three samples (one noisy sample decides nothing).

Exit status: 0 = pass; 1 = RSS grew past the limit after warm-up (--max-growth-mib, or --max-growth-percent
of the baseline, whichever is larger), or any unexpected error: a status other than OK (RESOURCE_EXHAUSTED
only allowed with --allow-exhausted), a wrong position, a log-probability mismatch, or the server exiting;
2 = bad usage or the server did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from lstmserve_client.proto import lstm_service_pb2 as pb  # noqa: E402
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc  # noqa: E402

MiB = 1024 * 1024
HISTORY_LIMIT = 1500  # a session is reset once it was fed this many tokens (bounds the offline check)


# ---- the verdict (pure: unit-tested) -------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the start
    rss: int | None  # bytes, None if unknown
    calls: int  # in the interval
    errors: int  # in the interval
    verified: int = 0  # offline checks passed in the interval


def verdict(samples: list[Sample], warmup: float, max_growth_mib: float, max_growth_percent: float,
            errors: Counter) -> tuple[bool, list[str]]:
    """(passed, reasons): RSS growth after warm-up within the limit, and no unexpected error."""
    reasons = [f"{n} unexpected error(s): {what}" for what, n in sorted(errors.items())]
    measured = [s for s in samples if s.rss is not None]
    after = [s for s in measured if s.t >= warmup]
    if measured and after:
        baseline = after[0].rss or 0  # the first sample once the warm-up is over
        final = statistics.median(s.rss or 0 for s in after[-3:])
        limit = max(max_growth_mib * MiB, baseline * max_growth_percent / 100)
        growth = final - baseline
        if growth > limit:
            reasons.append(f"RSS grew {growth / MiB:+.1f} MiB after warm-up (baseline {baseline / MiB:.1f} MiB, "
                           f"limit {limit / MiB:.1f} MiB)")
    elif measured:
        reasons.append("no RSS sample after the warm-up: run longer than --warmup-seconds")
    return not reasons, reasons


# ---- the server -----------------------------------------------------------------------------------------


def rss_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def started_server(checkpoint: str, server_args: list[str], log_path: Path):
    port_file = Path(tempfile.mkdtemp(prefix="lstm-soak-")) / "port"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.server", "--checkpoint", checkpoint, "--port", "0", "--port-file",
             str(port_file), "--metrics-port", "-1", "--durability", "none", *server_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise SystemExit(f"soak: the server did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.05)
        yield proc, f"127.0.0.1:{int(port_file.read_text())}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---- the load ---------------------------------------------------------------------------------------------


@dataclass
class Stats:
    calls: int = 0
    errors: int = 0
    verified: int = 0
    unexpected: Counter = field(default_factory=Counter)

    def fail(self, what: str) -> None:
        self.errors += 1
        self.unexpected[what] += 1


@dataclass
class Session:
    sid: str
    fed: list[int] = field(default_factory=list)  # every token since the last reset (input and generated)
    last_logprobs: list[list[float]] | None = None  # of the latest step, if it asked for them
    last_end: int = 0  # len(fed) after that step


class Soak:
    def __init__(self, args: argparse.Namespace, stubs: list[pb_grpc.LstmServiceStub], vocab: list[str]) -> None:
        self.args = args
        self.stubs = stubs
        self.vocab = vocab
        self.index = {c: i for i, c in enumerate(vocab)}
        self.stats = Stats()
        self.sessions: list[Session] = []
        self.rng = random.Random(args.seed)
        self.allowed = {grpc.StatusCode.OK} | ({grpc.StatusCode.RESOURCE_EXHAUSTED} if args.allow_exhausted else set())
        text = (ROOT / "data" / "tinyshakespeare.txt")
        corpus = text.read_text(encoding="utf-8") if text.exists() else "".join(vocab) * 200
        self.corpus = "".join(c for c in corpus if c in self.index)

    def stub(self) -> pb_grpc.LstmServiceStub:
        return self.rng.choice(self.stubs)

    def text(self, n: int) -> str:
        start = self.rng.randrange(len(self.corpus) - n)
        return self.corpus[start : start + n]

    async def call(self, what: str, awaitable: Any) -> Any:
        self.stats.calls += 1
        try:
            return await awaitable
        except grpc.aio.AioRpcError as e:
            if e.code() in self.allowed:
                self.stats.errors += 1
            else:
                self.stats.fail(f"{what} {e.code().name}: {e.details()}")
            return None

    def check(self, what: str, ok: bool) -> None:
        if not ok:
            self.stats.fail(f"{what}: wrong position")

    async def worker(self, session: Session, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            op = self.rng.choices(["step", "stream", "generate", "fork", "reset", "get"], [40, 20, 15, 10, 3, 12])[0]
            await getattr(self, op)(session)
            if len(session.fed) > HISTORY_LIMIT:
                await self.reset(session)

    async def step(self, s: Session) -> None:
        chunk = self.text(self.rng.randint(1, 64))
        want = self.rng.random() < 0.3
        r = await self.call("Step", self.stub().Step(
            pb.StepRequest(session_id=s.sid, text=chunk, expected_position=len(s.fed), return_logprobs=want)))
        if r is not None:
            s.fed += [self.index[c] for c in chunk]
            self.check("Step", r.position == len(s.fed) and len(r.outputs) == len(chunk))
            if want:
                s.last_logprobs, s.last_end = [list(o.logprobs) for o in r.outputs], len(s.fed)

    async def stream(self, s: Session) -> None:
        chunks = [self.text(self.rng.randint(1, 32)) for _ in range(self.rng.randint(2, 4))]
        call = self.stub().StreamSteps(iter([pb.StepRequest(session_id=s.sid, text=c, top_k=3) for c in chunks]))

        async def run() -> list:
            return [r async for r in call]

        responses = await self.call("StreamSteps", run())
        if responses is not None:
            for chunk, r in zip(chunks, responses):
                s.fed += [self.index[c] for c in chunk]
                self.check("StreamSteps", r.position == len(s.fed))
            self.check("StreamSteps", len(responses) == len(chunks))

    async def generate(self, s: Session) -> None:
        n = self.rng.randint(1, 32)
        call = self.stub().Generate(pb.GenerateRequest(session_id=s.sid, max_tokens=n, seed=self.rng.getrandbits(63),
                                                       temperature=0.8, expected_position=len(s.fed)))

        async def run() -> list:
            return [r async for r in call]

        responses = await self.call("Generate", run())
        if responses is not None:
            for r in responses:
                s.fed.append(r.token)
                self.check("Generate", r.position == len(s.fed))
            self.check("Generate", len(responses) == n)

    async def fork(self, s: Session) -> None:
        r = await self.call("ForkSession", self.stub().ForkSession(pb.ForkSessionRequest(session_id=s.sid)))
        if r is None:
            return
        child = r.session.session_id
        self.check("ForkSession", r.session.position == len(s.fed))
        chunk = self.text(8)
        step = await self.call("Step(fork)", self.stub().Step(pb.StepRequest(session_id=child, text=chunk)))
        if step is not None:
            self.check("Step(fork)", step.position == len(s.fed) + 8)
        await self.call("DeleteSession", self.stub().DeleteSession(pb.DeleteSessionRequest(session_id=child)))

    async def reset(self, s: Session) -> None:
        r = await self.call("ResetSession", self.stub().ResetSession(pb.ResetSessionRequest(session_id=s.sid)))
        if r is not None:
            s.fed, s.last_logprobs = [], None
            self.check("ResetSession", r.session.position == 0)

    async def get(self, s: Session) -> None:
        r = await self.call("GetSession", self.stub().GetSession(pb.GetSessionRequest(session_id=s.sid)))
        if r is not None:
            self.check("GetSession", r.session.position == len(s.fed))


class Verifier:
    """Offline forward of a session's whole input, compared with the log-probabilities the server returned."""

    def __init__(self, checkpoint: str, tolerance: float) -> None:
        import torch

        from model.checkpoint import load_checkpoint

        torch.set_num_threads(1)  # beside a busy server, more threads only contend (and spin)
        self.torch = torch
        self.ckpt = load_checkpoint(checkpoint)
        self.tolerance = tolerance

    def check(self, session: Session) -> float | None:
        """The largest difference, or None if the session has nothing to check."""
        if session.last_logprobs is None or not session.last_end:
            return None
        torch = self.torch
        tokens = session.fed[: session.last_end]
        with torch.no_grad():
            logits, _ = self.ckpt.model(torch.tensor([tokens]))
            expected = torch.log_softmax(logits[0].float(), dim=-1)[-len(session.last_logprobs) :]
        return float((expected - torch.tensor(session.last_logprobs)).abs().max())


async def run(args: argparse.Namespace, target: str, pid: int | None, server: subprocess.Popen | None) -> int:
    channels = [grpc.aio.insecure_channel(target) for _ in range(args.channels)]
    stubs = [pb_grpc.LstmServiceStub(c) for c in channels]
    info = await stubs[0].GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    soak = Soak(args, stubs, list(info.vocab))
    verifier = Verifier(args.checkpoint, args.verify_tolerance) if args.verify and args.checkpoint else None
    duration = args.seconds if args.seconds else args.minutes * 60
    started = time.monotonic()
    for _ in range(args.sessions):
        r = await soak.call("CreateSession", stubs[0].CreateSession(pb.CreateSessionRequest()))
        if r is not None:
            soak.sessions.append(Session(r.session.session_id))
    samples: list[Sample] = []
    stop_at = started + duration
    workers = [asyncio.create_task(soak.worker(s, stop_at)) for s in soak.sessions]
    print(f"soak: {len(soak.sessions)} sessions for {duration:.0f}s against {target} (server pid {pid}); "
          f"warm-up {args.warmup_seconds:.0f}s", flush=True)
    print(f"{'time_s':>7} {'rss_mib':>8} {'growth':>8} {'calls':>7} {'calls/s':>8} {'errors':>6} {'verified':>8}",
          flush=True)
    baseline: int | None = None
    last_calls = last_errors = last_verified = 0
    last_t = 0.0
    while time.monotonic() < stop_at and any(not w.done() for w in workers):
        await asyncio.sleep(min(args.sample_seconds, max(stop_at - time.monotonic(), 0.01)))
        if verifier is not None:
            candidates = [s for s in soak.sessions if s.last_logprobs is not None]
            if candidates:
                chosen = soak.rng.choice(candidates)
                snapshot = Session(chosen.sid, list(chosen.fed), chosen.last_logprobs, chosen.last_end)
                diff = await asyncio.to_thread(verifier.check, snapshot)  # off the event loop
                if diff is not None and diff > verifier.tolerance:
                    soak.stats.fail(f"log-probabilities differ from an offline forward by {diff:.2e}")
                elif diff is not None:
                    soak.stats.verified += 1
        t = time.monotonic() - started
        rss = rss_of(pid) if pid else None
        if server is not None and server.poll() is not None:
            soak.stats.fail(f"the server exited with {server.returncode}")
            break
        st = soak.stats
        samples.append(Sample(t, rss, st.calls - last_calls, st.errors - last_errors, st.verified - last_verified))
        if baseline is None and t >= args.warmup_seconds:
            baseline = rss
        growth = f"{(rss - baseline) / MiB:+8.1f}" if rss is not None and baseline is not None else f"{'-':>8}"
        rss_text = f"{rss / MiB:8.1f}" if rss is not None else f"{'?':>8}"
        print(f"{t:7.1f} {rss_text} {growth} {samples[-1].calls:7d} {samples[-1].calls / max(t - last_t, 1e-9):8.1f} "
              f"{samples[-1].errors:6d} {samples[-1].verified:8d}", flush=True)
        last_calls, last_errors, last_verified, last_t = st.calls, st.errors, st.verified, t
    await asyncio.gather(*workers)
    for s in soak.sessions:
        await soak.call("DeleteSession", stubs[0].DeleteSession(pb.DeleteSessionRequest(session_id=s.sid)))
    await asyncio.sleep(0.5)
    if pid:
        rss = rss_of(pid)
        print(f"after deleting the sessions: RSS {rss / MiB:.1f} MiB" if rss else "server gone", flush=True)
    for c in channels:
        await c.close()
    passed, reasons = verdict(samples, args.warmup_seconds, args.max_growth_mib, args.max_growth_percent,
                              soak.stats.unexpected)
    total = soak.stats
    print(f"{total.calls} calls, {total.errors} errors ({sum(total.unexpected.values())} unexpected), "
          f"{total.verified} offline checks passed", flush=True)
    if passed:
        print("PASS", flush=True)
        return 0
    for reason in reasons:
        print(f"FAIL: {reason}", flush=True)
    return 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"),
                   help="checkpoint to serve (and to verify against)")
    p.add_argument("--target", default="", help="an already running server (HOST:PORT); default: start one")
    p.add_argument("--pid", type=int, default=0, help="with --target: the server's pid, for its RSS")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=0.0, help="duration in seconds (overrides --minutes)")
    p.add_argument("--warmup-seconds", type=float, default=60.0)
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--max-growth-mib", type=float, default=64.0)
    p.add_argument("--max-growth-percent", type=float, default=10.0)
    p.add_argument("--allow-exhausted", action="store_true", help="RESOURCE_EXHAUSTED is not an error")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the offline forward checks")
    p.add_argument("--verify-tolerance", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-log", default="", help="where the started server logs (default: a temp file)")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.sample_seconds <= 0 or (args.seconds or args.minutes * 60) <= 0:
        p.error("--sessions, --sample-seconds and the duration must be positive")
    if args.target and not args.pid:
        print("soak: no --pid: memory is not checked", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.target:
        return asyncio.run(run(args, args.target, args.pid or None, None))
    log_path = Path(args.server_log or tempfile.mkstemp(prefix="lstm-soak-server-", suffix=".log")[1])
    with started_server(args.checkpoint, args.server_arg, log_path) as (proc, target):
        status = asyncio.run(run(args, target, proc.pid, proc))
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    print(f"server log: {log_path} (exit {code})", flush=True)
    if code != 0:
        print(f"FAIL: the server exited with {code} on SIGTERM", flush=True)
        return 1
    return status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

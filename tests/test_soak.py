"""scripts/soak.py: a short soak in CI, its failure modes, and its verdict and offline check as units.

The long soak runs only on request: `pytest -m slow tests/test_soak.py` (LSTM_SOAK_MINUTES, default 10).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "soak.py"
MiB = 1024 * 1024


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


soak = load_soak()


def run_soak(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_short_soak_passes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc = run_soak("--checkpoint", str(tiny_checkpoint), "--sessions", "16", "--seconds", "20",
                    "--warmup-seconds", "6", "--sample-seconds", "2", "--server-log", str(tmp_path / "server.log"))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "PASS" in out and "FAIL" not in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\.\d\s+\d+\.\d", line)]
    assert len(rows) >= 6, out  # one row every 2 s, with the RSS of the server
    calls, errors, unexpected, verified = map(int, re.search(
        r"(\d+) calls, (\d+) errors \((\d+) unexpected\), (\d+) offline checks passed", out).groups())
    assert calls > 500 and errors == unexpected == 0 and verified >= 5, out
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_soak_fails_on_unexpected_errors(tiny_checkpoint: Path) -> None:
    """A server with room for 4 sessions, a soak of 6: CreateSession and ForkSession get RESOURCE_EXHAUSTED,
    which the soak reports and fails on (exit 1)."""
    proc = run_soak("--checkpoint", str(tiny_checkpoint), "--server-arg=--max-sessions=4", "--sessions", "6",
                    "--seconds", "4", "--warmup-seconds", "1", "--sample-seconds", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"FAIL: \d+ unexpected error\(s\): CreateSession RESOURCE_EXHAUSTED", proc.stdout), proc.stdout


def test_verdict() -> None:
    S = soak.Sample
    flat = [S(t, 400 * MiB + (t % 3) * MiB, 100, 0) for t in range(0, 60, 5)]
    assert soak.verdict(flat, 10, 16, 1, Counter()) == (True, [])
    # Growth after warm-up past the limit fails; the same growth during warm-up does not count.
    growing = [S(t, (400 + (t - 10) * 2 if t >= 10 else 300 + t * 10) * MiB, 100, 0) for t in range(0, 60, 5)]
    passed, reasons = soak.verdict(growing, 10, 16, 1, Counter())
    assert not passed and "RSS grew" in reasons[0] and "baseline 400.0" in reasons[0]
    assert soak.verdict(growing, 10, 200, 1, Counter())[0]  # a looser limit passes it
    assert soak.verdict(growing, 10, 16, 50, Counter())[0]  # 50% of the 400 MiB baseline: 200 MiB allowed
    # One spike in the last samples is not growth (the median of the last three decides).
    spiky = flat[:-1] + [S(60, 900 * MiB, 100, 0)]
    assert soak.verdict(spiky, 10, 16, 1, Counter())[0]
    # Any unexpected error fails, whatever the memory did.
    passed, reasons = soak.verdict(flat, 10, 16, 1, Counter({"Step INTERNAL: boom": 2}))
    assert not passed and reasons == ["2 unexpected error(s): Step INTERNAL: boom"]
    # A run that ends inside the warm-up cannot pass on memory.
    assert not soak.verdict(flat, 100, 16, 1, Counter())[0]


def test_verifier_catches_wrong_logprobs(tiny_checkpoint: Path) -> None:
    from model.checkpoint import load_checkpoint

    verifier = soak.Verifier(str(tiny_checkpoint), 1e-4)
    ckpt = load_checkpoint(tiny_checkpoint)
    tokens = ckpt.tokenizer.encode("Now is the winter of our discontent")
    with torch.no_grad():
        logits, _ = ckpt.model(torch.tensor([tokens]))
        logprobs = torch.log_softmax(logits[0], dim=-1)[-5:].tolist()
    right = soak.Session("s", tokens + [1, 2], logprobs, len(tokens))  # tokens after the checked step are ignored
    assert verifier.check(right) <= 1e-6
    wrong = soak.Session("s", tokens, [row[:] for row in logprobs], len(tokens))
    wrong.last_logprobs[2][7] += 1e-3
    assert verifier.check(wrong) > 1e-4
    shifted = soak.Session("s", [0, *tokens], logprobs, len(tokens) + 1)  # the same outputs one token later
    assert verifier.check(shifted) > 1e-4
    assert verifier.check(soak.Session("s")) is None


SOAK_MINUTES = os.environ.get("LSTM_SOAK_MINUTES", "10")


@pytest.mark.slow
@pytest.mark.timeout(float(SOAK_MINUTES) * 60 + 600)  # beyond the suite's 300 s per test, and run_soak's own limit
def test_long_soak(tiny_checkpoint: Path) -> None:
    """On request only (pytest -m slow): LSTM_SOAK_MINUTES of 64 sessions."""
    proc = run_soak("--checkpoint", str(tiny_checkpoint), "--sessions", "64", "--minutes", SOAK_MINUTES,
                    timeout=float(SOAK_MINUTES) * 60 + 300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr

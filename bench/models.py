"""The checkpoints the benchmarks run: the reference model and the shipped default."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bench.loadgen import CORPUS, BenchError
from model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, read_meta, save_checkpoint
from model.model import CharRNN, ModelConfig
from model.tokenizer import CharTokenizer

# The reference model: what the performance targets are stated for.
REFERENCE = {"num_layers": 2, "hidden_size": 512, "embedding_size": 128, "vocab_size": 65}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lstm-serve-bench"


def reference_checkpoint(directory: Path | None = None, seed: int = 0) -> Path:
    """The reference model (2 x 512 LSTM, embedding 128, vocab 65, random weights), written once.

    The vocabulary is the corpus's characters; the weights are torch's default init under
    `seed`. Reused when already there.
    """
    target = (directory or cache_dir()) / f"reference-l2-h512-e128-seed{seed}"
    try:
        meta = read_meta(target)
        cfg = meta["config"]
        if (cfg.get("num_layers"), cfg.get("hidden_size"), cfg.get("embedding_size"), cfg.get("vocab_size")) == (
            2, 512, 128, 65
        ):
            return target
    except CheckpointError:
        pass
    tokenizer = CharTokenizer.from_text(CORPUS.read_text(encoding="utf-8"))
    if len(tokenizer) != REFERENCE["vocab_size"]:
        raise BenchError(f"{CORPUS}: expected {REFERENCE['vocab_size']} distinct characters, got {len(tokenizer)}")
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CharRNN(ModelConfig(vocab_size=len(tokenizer), embedding_size=128, hidden_size=512, num_layers=2))
    finally:
        torch.random.set_rng_state(generator_state)
    save_checkpoint(target, model, tokenizer, {"note": f"lstm-bench reference model, random weights (seed {seed})"})
    return target


def resolve_model(name: str, cache: Path | None = None) -> Path:
    """'reference', 'default' or a checkpoint directory -> a checkpoint directory."""
    if name == "reference":
        return reference_checkpoint(cache)
    path = DEFAULT_CHECKPOINT if name == "default" else Path(name)
    try:
        read_meta(path)
    except CheckpointError as e:
        raise BenchError(str(e)) from None
    return path

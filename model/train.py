"""lstm-train: train the character-level model and write a servable checkpoint.

Truncated backpropagation through time, as served: the batch is B contiguous streams
through the training text; each step reads the next `--bptt` characters of every
stream, the recurrent state is carried from one chunk to the next and detached, so
the forward pass sees the whole stream while gradients flow back at most k steps.

Output directory:
    best/           the checkpoint with the lowest validation loss (servable)
    resume/         the latest training state: weights, optimizer, RNG, data position
    metrics.jsonl   one JSON record per logged train step and per validation
    loss.png        train and validation loss curves
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from model.checkpoint import (
    META_FILE,
    CheckpointError,
    read_meta,
    restore_moved_aside,
    save_checkpoint,
    sha256_file,
    write_dir_atomically,
)
from model.model import CharRNN, ModelConfig, State, count_parameters, detach_state, resolve_device
from model.tokenizer import CharTokenizer

TRAIN_FRACTION = 0.9  # first 90% trains, last 10% validates (the usual split of this corpus)
VAL_STREAMS = 16  # validation runs over the held-out text as this many contiguous streams
OPTIMIZER_FILE = "optimizer.safetensors"
TRAIN_STATE_FILE = "train_state.json"


@dataclass
class TrainArgs:
    data: str = "data/tinyshakespeare.txt"  # training corpus (UTF-8 text)
    out: str = "runs/default"  # output directory (best/, resume/, metrics.jsonl, loss.png)
    resume: str | None = None  # output directory of an earlier run to continue
    max_steps: int = 4000  # optimizer steps in all (the cosine schedule ends here)
    time_budget: float = 0.0  # seconds for this invocation; 0 = no limit. Saves resume state on stop
    seed: int = 1337  # seeds weights, dropout and sampling
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast where the hardware has it) | bf16 | fp32
    cell_type: str = "lstm"  # lstm | gru
    embedding_size: int = 128
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.25  # between layers and before the head
    batch_size: int = 64  # contiguous streams per step
    bptt: int = 128  # chunk length k: gradients flow back at most k steps
    lr: float = 2e-3  # peak learning rate (AdamW)
    min_lr: float = 2e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW decay on matrices (not biases)
    clip_mode: str = "norm"  # norm: global L2 norm; value: elementwise [-clip, clip]
    clip: float = 1.0  # max global norm, or the bound for clip_mode=value
    eval_interval: int = 200  # validate, sample and save every this many steps
    log_interval: int = 10  # append a train record to metrics.jsonl every this many steps
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            embedding_size=self.embedding_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            dropout=self.dropout,
            cell_type=self.cell_type,  # type: ignore[arg-type]
        )


HELP = {
    "data": "training corpus, UTF-8 text; first 90%% trains, last 10%% validates",
    "out": "output directory: best/ (servable checkpoint), resume/, metrics.jsonl, loss.png",
    "resume": "continue the run whose output directory this is (architecture and data come from it)",
    "max_steps": "total optimizer steps; the cosine schedule ends here",
    "time_budget": "stop after this many seconds of this invocation, saving resume state (0 = no limit)",
    "seed": "seed for weights, dropout and samples",
    "device": "auto picks cuda when available, else cpu",
    "precision": "auto = bf16 autocast on CUDA and on CPUs with native bf16, else fp32",
    "cell_type": "recurrent cell: lstm (h and c) or gru (h only)",
    "embedding_size": "token embedding width",
    "hidden_size": "hidden width of every recurrent layer",
    "num_layers": "stacked recurrent layers",
    "dropout": "dropout between layers and before the head",
    "batch_size": "contiguous streams per step (B)",
    "bptt": "chunk length k of truncated backpropagation through time",
    "lr": "peak AdamW learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay on matrices",
    "clip_mode": "gradient clipping: norm (global L2 norm) or value (elementwise)",
    "clip": "max global norm (norm) or bound B for [-B, B] (value)",
    "eval_interval": "validate, sample and save every N steps",
    "log_interval": "write a train record to metrics.jsonl every N steps",
    "threads": "torch CPU threads (0 = torch's default)",
}
CHOICES = {
    "device": ["auto", "cpu", "cuda"],
    "precision": ["auto", "bf16", "fp32"],
    "cell_type": ["lstm", "gru"],
    "clip_mode": ["norm", "value"],
}
# What a resumed run may change; everything else comes from the run being resumed.
RESUME_OVERRIDABLE = {"out", "resume", "max_steps", "time_budget", "device", "eval_interval", "log_interval", "threads"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-train",
        description="Train the character-level LSTM/GRU language model served by lstm-serve.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainArgs):
        default = f.default
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=default,
            choices=CHOICES.get(f.name),
            help=HELP[f.name],
        )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainArgs, set[str]]:
    """The parsed arguments and the names given explicitly on the command line."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    # argparse fills defaults into a fresh namespace only for absent attributes, so re-parse
    # against a namespace of sentinels to learn which options the user actually typed.
    sentinel = object()
    probe = argparse.Namespace(**{k: sentinel for k in vars(ns)})
    parser.parse_args(argv, namespace=probe)
    given = {k for k, v in vars(probe).items() if v is not sentinel}
    args = TrainArgs(**vars(ns))
    problem = out_of_range(args)
    if problem:
        parser.error(problem)
    return args, given


# Each numeric option's allowed range [low, high); a value outside it ruins a run silently (a
# negative --clip turned norm clipping into gradient ascent) or fails mid-run.
RANGES: dict[str, tuple[float, float]] = {
    "max_steps": (1, math.inf), "time_budget": (0, math.inf),
    "embedding_size": (1, math.inf), "hidden_size": (1, math.inf), "num_layers": (1, math.inf),
    "dropout": (0, 1), "batch_size": (1, math.inf), "bptt": (1, math.inf),
    "lr": (1e-12, math.inf), "min_lr": (0, math.inf), "warmup_steps": (0, math.inf),
    "weight_decay": (0, math.inf), "clip": (1e-12, math.inf),
    "eval_interval": (1, math.inf), "log_interval": (1, math.inf), "threads": (0, math.inf),
}


def out_of_range(args: TrainArgs) -> str | None:
    """What is wrong with the numeric options, or None."""
    for name, (low, high) in RANGES.items():
        value = getattr(args, name)
        if not (math.isfinite(value) and low <= value < high):
            upper = "" if high == math.inf else f" and below {high:g}"
            lower = "above 0" if 0 < low < 1 else f"at least {low:g}"
            return f"--{name.replace('_', '-')} must be {lower}{upper}, got {value:g}"
    if args.min_lr > args.lr:
        return f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}"
    return None


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device.type == "cuda":
        return True
    if precision == "bf16" and not native:  # oneDNN would fail at the first forward, unreadably
        raise SystemExit("lstm-train: --precision bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX); "
                         "this one has none: use --precision fp32 (or auto)")
    return native


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def clip_gradients(params: list[torch.nn.Parameter], mode: str, bound: float) -> float:
    """Clip in place; return the global gradient L2 norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if mode == "norm":
        return float(torch.nn.utils.clip_grad_norm_(params, bound))
    norm = float(torch.nn.utils.get_total_norm(grads))
    torch.nn.utils.clip_grad_value_(params, bound)
    return norm


class StreamBatches:
    """B contiguous streams through a token sequence, read k tokens at a time."""

    def __init__(self, ids: torch.Tensor, batch: int, bptt: int) -> None:
        length = (ids.numel() - 1) // batch
        if length < bptt:
            raise ValueError(f"text too short: {ids.numel()} tokens for {batch} streams of >= {bptt + 1}")
        self.inputs = ids[: batch * length].view(batch, length)
        self.targets = ids[1 : batch * length + 1].view(batch, length)
        self.bptt = bptt
        self.chunks_per_epoch = length // bptt

    def chunk(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = index * self.bptt
        return self.inputs[:, p : p + self.bptt], self.targets[:, p : p + self.bptt]


@torch.no_grad()
def evaluate(model: CharRNN, ids: torch.Tensor, device: torch.device, chunk: int = 256) -> float:
    """Mean cross-entropy (nats/char) over the held-out text, state carried across chunks, fp32."""
    was_training = model.training
    model.eval()
    length = (ids.numel() - 1) // VAL_STREAMS
    inputs = ids[: VAL_STREAMS * length].view(VAL_STREAMS, length).to(device)
    targets = ids[1 : VAL_STREAMS * length + 1].view(VAL_STREAMS, length).to(device)
    state: State | None = None
    total, count = 0.0, 0
    for p in range(0, length, chunk):
        logits, state = model(inputs[:, p : p + chunk], state)
        y = targets[:, p : p + chunk]
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def sample(model: CharRNN, tokenizer: CharTokenizer, prompt: str, length: int, temperature: float, seed: int) -> str:
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.tensor([tokenizer.encode(prompt)], device=device)
    logits, state = model(tokens)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].float() / temperature, dim=-1).cpu()
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    model.train(was_training)
    return prompt + tokenizer.decode(out)


def state_to_tensors(state: State) -> dict[str, torch.Tensor]:
    parts = state if isinstance(state, tuple) else (state,)
    return {f"carried.{i}": s.detach().float().cpu().contiguous() for i, s in enumerate(parts)}


def tensors_to_state(tensors: dict[str, torch.Tensor], cell_type: str, device: torch.device) -> State:
    if cell_type == "lstm":
        return (tensors["carried.0"].to(device), tensors["carried.1"].to(device))
    return tensors["carried.0"].to(device)


def save_resume(
    out: Path,
    model: CharRNN,
    tokenizer: CharTokenizer,
    optimizer: torch.optim.Optimizer,
    state: State,
    progress: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    """Everything needed to continue exactly: weights, optimizer, RNG, carried state, position."""
    opt_sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in opt_sd["state"].items():
        for key, value in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors.update(state_to_tensors(state))
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()

    def fill(tmp: Path) -> None:
        save_checkpoint(tmp / "weights", model, tokenizer, meta)
        for f in (tmp / "weights").iterdir():
            f.rename(tmp / f.name)
        (tmp / "weights").rmdir()
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        record = {"progress": progress, "param_groups": opt_sd["param_groups"]}
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    write_dir_atomically(out / "resume", fill)


def load_resume(
    run_dir: Path, model: CharRNN, optimizer: torch.optim.Optimizer, cell_type: str, device: torch.device
) -> tuple[dict[str, Any], State]:
    resume = run_dir / "resume"
    record = json.loads((resume / TRAIN_STATE_FILE).read_text())
    weights = load_file(str(resume / "model.safetensors"))
    if sha256_file(resume / "model.safetensors") != read_meta(resume)["weights_sha256"]:
        raise CheckpointError(f"{resume / 'model.safetensors'}: hash does not match {META_FILE}")
    model.load_state_dict(weights)
    tensors = load_file(str(resume / OPTIMIZER_FILE))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": record["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return record["progress"], tensors_to_state(tensors, cell_type, device)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records up to `step`, the step the resume state was saved at.

    Train records are appended every log interval but the state is saved only at evaluations
    (or on a stop), so after a kill the records past the saved step are about to be written
    again. A torn last line (killed mid-write) goes too. Replaced atomically: a crash here
    leaves the old file or the new one.
    """
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec["step"] <= step:
            kept.append(line + "\n")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            train.append((rec["step"], rec["loss"]))
        elif rec["kind"] == "val":
            val.append((rec["step"], rec["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=0.8, alpha=0.7)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def train(args: TrainArgs) -> dict[str, Any]:
    """Run (or continue) training; return the final progress record."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"lstm-train: {e}") from None
    bf16 = use_bf16(args.precision, device)
    torch.manual_seed(args.seed)

    # Recorded absolute, so that --resume works from any working directory.
    data_path = Path(args.data).resolve()
    args = replace(args, data=str(data_path))
    text = data_path.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    split = int(len(ids) * TRAIN_FRACTION)
    train_ids, val_ids = ids[:split], ids[split:]
    batches = StreamBatches(train_ids.to(device), args.batch_size, args.bptt)

    config = args.model_config(len(tokenizer))
    model = CharRNN(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
    )
    params = list(model.parameters())

    progress: dict[str, Any] = {
        "step": 0,  # optimizer steps done
        "epoch": 0,  # completed passes over the training streams
        "chunk": 0,  # next chunk index within the epoch
        "tokens_seen": 0,  # training characters consumed
        "best_val_loss": None,  # lowest validation loss so far
        "best_step": None,
        "wall_time": 0.0,  # seconds of training over all invocations
    }
    state: State = model.zero_state(args.batch_size)
    if args.resume:
        progress, state = load_resume(Path(args.resume), model, optimizer, config.cell_type, device)

    data_sha = sha256_file(data_path)
    metrics_path = out / "metrics.jsonl"
    if not args.resume and metrics_path.exists():
        metrics_path.unlink()
    if args.resume and Path(args.resume).resolve() != out.resolve():
        # Continued elsewhere: the new directory carries the run's history (its best checkpoint
        # so far, which only a better evaluation replaces, and its metrics).
        earlier = Path(args.resume)
        if (earlier / "best").is_dir() and not (out / "best").exists():
            shutil.copytree(earlier / "best", out / "best")
        if (earlier / "metrics.jsonl").is_file() and not metrics_path.exists():
            shutil.copyfile(earlier / "metrics.jsonl", metrics_path)
    if args.resume and metrics_path.exists():
        truncate_metrics(metrics_path, progress["step"])

    def meta() -> dict[str, Any]:
        return {
            "training": asdict(args),
            "data_sha256": data_sha,
            "data_path": data_path.name,
            "best_val_loss": progress["best_val_loss"],
            "steps": progress["step"],
            "tokens_seen": progress["tokens_seen"],
            "wall_time_seconds": round(progress["wall_time"], 1),
            "device": device.type,
            "precision": "bf16-autocast" if bf16 else "fp32",
            "parameters": count_parameters(model),
        }

    def log(record: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    print(
        f"lstm-train: {config.cell_type} {config.num_layers}x{config.hidden_size}, "
        f"{count_parameters(model):,} parameters, vocab {len(tokenizer)}, device {device.type}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, {batches.chunks_per_epoch} chunks/epoch, "
        f"train {len(train_ids):,} / val {len(val_ids):,} chars",
        file=sys.stderr,
    )
    started = time.monotonic()
    wall_at_start = progress["wall_time"]
    bar = tqdm(
        total=args.max_steps, initial=progress["step"], desc="train", mininterval=2.0,
        dynamic_ncols=True, file=sys.stderr,
    )
    model.train()
    window_tokens, window_start = 0, time.monotonic()
    stopped_by_budget = False
    # SIGTERM/SIGINT: finish the current step, save the resume state, exit (resume later).
    interrupted: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: interrupted.append(signum))
    while progress["step"] < args.max_steps:
        step = progress["step"]
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if progress["chunk"] >= batches.chunks_per_epoch:
            progress["epoch"] += 1
            progress["chunk"] = 0
            state = model.zero_state(args.batch_size)  # the streams jump back to their starts
        x, y = batches.chunk(progress["chunk"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, state = model(x, state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(params, args.clip_mode, args.clip)
        optimizer.step()
        state = detach_state(state)
        state = (state[0].float(), state[1].float()) if isinstance(state, tuple) else state.float()

        progress["step"] = step + 1
        progress["chunk"] += 1
        progress["tokens_seen"] += x.numel()
        progress["wall_time"] = wall_at_start + time.monotonic() - started
        window_tokens += x.numel()
        loss_value = float(loss.detach())
        if (step + 1) % args.log_interval == 0:
            elapsed = time.monotonic() - window_start
            tps = window_tokens / max(elapsed, 1e-9)
            window_tokens, window_start = 0, time.monotonic()
            log({"kind": "train", "step": step + 1, "loss": loss_value, "lr": lr,
                 "grad_norm": grad_norm, "tokens_per_s": round(tps, 1), "epoch": progress["epoch"]})
            bar.set_postfix(loss=f"{loss_value:.3f}", gnorm=f"{grad_norm:.2f}", tok_s=f"{tps:,.0f}")
        bar.update(1)

        budget_hit = bool(interrupted) or (args.time_budget > 0 and time.monotonic() - started >= args.time_budget)
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_steps:
            val_loss = evaluate(model, val_ids, device)
            best = progress["best_val_loss"]
            if best is None or val_loss < best:
                progress["best_val_loss"], progress["best_step"] = val_loss, step + 1
                save_checkpoint(out / "best", model, tokenizer, meta())
            text_sample = sample(model, tokenizer, "\n", 200, 0.8, args.seed)
            log({"kind": "val", "step": step + 1, "val_loss": val_loss, "val_bits": val_loss / math.log(2),
                 "best_val_loss": progress["best_val_loss"], "sample": text_sample})
            bar.write(
                f"step {step + 1}: val {val_loss:.4f} nats/char ({val_loss / math.log(2):.3f} bits), "
                f"best {progress['best_val_loss']:.4f} @ {progress['best_step']}\n---\n{text_sample}\n---"
            )
            save_resume(out, model, tokenizer, optimizer, state, progress, meta())
            plot_losses(metrics_path, out / "loss.png")
        elif budget_hit:
            save_resume(out, model, tokenizer, optimizer, state, progress, meta())
        if budget_hit and progress["step"] < args.max_steps:
            stopped_by_budget = True
            break
    bar.close()
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if stopped_by_budget:
        why = "interrupted" if interrupted else "time budget reached"
        print(f"lstm-train: {why} at step {progress['step']}; state saved, continue with "
              f"--resume {out}", file=sys.stderr)
    else:
        print(f"lstm-train: done, best val {progress['best_val_loss']:.4f} nats/char at step "
              f"{progress['best_step']}; checkpoint {out / 'best'}", file=sys.stderr)
    return progress


def main(argv: list[str] | None = None) -> int:
    args, given = parse_args(argv)
    if args.resume:
        run_dir = Path(args.resume)
        for sub in ("resume", "best"):  # a crash between write_dir_atomically's fallback renames
            restore_moved_aside(run_dir / sub)
        try:
            saved_meta = json.loads((run_dir / "resume" / META_FILE).read_text())
            saved = saved_meta["training"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            print(f"lstm-train: cannot resume from {run_dir}: {e}", file=sys.stderr)
            return 2
        # The corpus is identified by its content (data_sha256), not by its path: it may move.
        changed = sorted(k for k in given - RESUME_OVERRIDABLE - {"data"} if getattr(args, k) != saved.get(k))
        if changed:
            print(
                f"lstm-train: --resume continues the run as it was started; it cannot change "
                f"{', '.join('--' + k.replace('_', '-') for k in changed)} "
                f"(it may change: {', '.join(sorted('--' + k.replace('_', '-') for k in RESUME_OVERRIDABLE))})",
                file=sys.stderr,
            )
            return 2
        data = Path(args.data if "data" in given else saved["data"])
        if not data.is_file():
            hint = "" if "data" in given else "; pass --data with the corpus the run was trained on"
            print(f"lstm-train: cannot resume from {run_dir}: corpus {data} not found{hint}", file=sys.stderr)
            return 2
        recorded, actual = saved_meta.get("data_sha256"), sha256_file(data)
        if recorded is not None and actual != recorded:
            print(f"lstm-train: cannot resume from {run_dir}: {data} is not the corpus the run was trained on "
                  f"(SHA-256 {actual[:12]}…, the run recorded {recorded[:12]}…)", file=sys.stderr)
            return 2
        merged = {**saved, **{k: getattr(args, k) for k in given & RESUME_OVERRIDABLE}, "data": str(data)}
        merged["time_budget"] = args.time_budget  # a budget belongs to one invocation
        if "out" not in given:
            merged["out"] = str(run_dir)
        merged["resume"] = str(run_dir)
        args = TrainArgs(**merged)
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

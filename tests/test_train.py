"""lstm-train: a tiny run learns, resume is exact, clipping, carried state, CLI, schedule.

Everything runs on a slice of the corpus with a tiny model, on one CPU thread.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model.train as train_module
from model.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint, sha256_file
from model.model import CharRNN, ModelConfig
from model.tokenizer import CharTokenizer
from model.train import (
    TRAIN_FRACTION,
    StreamBatches,
    TrainArgs,
    build_parser,
    clip_gradients,
    evaluate,
    lr_at,
    main,
    parse_args,
    train,
)

CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def corpus_slice(path: Path, chars: int) -> Path:
    path.write_text(CORPUS.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


TINY = dict(
    max_steps=150,
    batch_size=16,
    bptt=32,
    embedding_size=24,
    hidden_size=96,
    num_layers=1,
    dropout=0.0,
    lr=1e-2,
    min_lr=1e-3,
    warmup_steps=10,
    eval_interval=75,
    log_interval=10,
    device="cpu",
    precision="fp32",
    threads=1,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A ~3 s training run on the first 60k characters; shared by the tests that need a trained model."""
    root = tmp_path_factory.mktemp("tiny")
    data = corpus_slice(root / "slice.txt", 60_000)
    before = torch.get_num_threads()
    try:
        train(TrainArgs(data=str(data), out=str(root / "run"), **TINY))
    finally:
        torch.set_num_threads(before)
    return root / "run"


def val_ids_of(run: Path) -> torch.Tensor:
    meta = json.loads((run / "best" / META_FILE).read_text())
    text = (run.parent / "slice.txt").read_text(encoding="utf-8")
    ids = torch.tensor(CharTokenizer(meta["vocab"]).encode(text))
    return ids[int(len(ids) * TRAIN_FRACTION) :]


def test_tiny_run_learns_far_below_uniform(tiny_run):
    records = read_metrics(tiny_run)
    vals = [r for r in records if r["kind"] == "val"]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in vals] == [75, 150]
    assert [r["step"] for r in trains] == list(range(10, 151, 10))

    meta = json.loads((tiny_run / "best" / META_FILE).read_text())
    uniform = math.log(len(meta["vocab"]))
    best = meta["best_val_loss"]
    assert best == min(r["val_loss"] for r in vals)
    assert best < 0.75 * uniform, (best, uniform)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert trains[-1]["loss"] < 0.75 * uniform
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in trains)
    assert abs(vals[-1]["val_bits"] - vals[-1]["val_loss"] / math.log(2)) < 1e-9
    assert isinstance(vals[-1]["sample"], str) and len(vals[-1]["sample"]) == 201

    assert meta["steps"] == 150 and meta["tokens_seen"] == 150 * 16 * 32
    assert meta["data_sha256"] == sha256_file(tiny_run.parent / "slice.txt")
    assert meta["training"]["hidden_size"] == 96
    assert (tiny_run / "loss.png").stat().st_size > 1000
    assert (tiny_run / "resume" / "optimizer.safetensors").is_file()


def test_best_checkpoint_loads_and_reproduces_val_loss(tiny_run):
    ckpt = load_checkpoint(tiny_run / "best")
    assert ckpt.config == ModelConfig(vocab_size=len(ckpt.tokenizer), embedding_size=24, hidden_size=96, num_layers=1)
    val = evaluate(ckpt.model, val_ids_of(tiny_run), torch.device("cpu"))
    assert abs(val - ckpt.meta["best_val_loss"]) < 1e-5


def test_evaluate_carries_state_so_chunk_size_does_not_matter(tiny_run):
    model = load_checkpoint(tiny_run / "best").model
    ids = val_ids_of(tiny_run)
    cpu = torch.device("cpu")
    whole = evaluate(model, ids, cpu, chunk=10_000)
    assert abs(evaluate(model, ids, cpu, chunk=32) - whole) < 1e-5
    assert abs(evaluate(model, ids, cpu, chunk=7) - whole) < 1e-5
    assert not model.training


@torch.no_grad()
def test_carried_state_beats_zero_state(tiny_run):
    """TBPTT carries the state into the next chunk; the trained model relies on it."""
    model = load_checkpoint(tiny_run / "best").model
    ids = val_ids_of(tiny_run)
    streams, k = 8, 32
    length = (ids.numel() - 1) // streams
    x = ids[: streams * length].view(streams, length)
    y = ids[1 : streams * length + 1].view(streams, length)

    carried_losses, zero_losses = [], []
    state = None
    for p in range(0, length - k + 1, k):
        xc, yc = x[:, p : p + k], y[:, p : p + k]
        if state is not None:  # skip chunk 0, where carried and zero state coincide
            zero_logits, _ = model(xc, None)
            zero_losses.append(float(F.cross_entropy(zero_logits.flatten(0, 1), yc.flatten())))
        logits, state = model(xc, state)
        if len(carried_losses) < len(zero_losses):
            carried_losses.append(float(F.cross_entropy(logits.flatten(0, 1), yc.flatten())))

    assert len(carried_losses) == len(zero_losses) >= 10
    assert all(c != z for c, z in zip(carried_losses, zero_losses, strict=True))
    mean_carried = sum(carried_losses) / len(carried_losses)
    mean_zero = sum(zero_losses) / len(zero_losses)
    assert mean_carried < mean_zero - 0.01, (mean_carried, mean_zero)
    assert sum(c < z for c, z in zip(carried_losses, zero_losses, strict=True)) > len(zero_losses) // 2


RESUME_ARGS = [
    "--max-steps", "14",
    "--batch-size", "16",
    "--bptt", "32",
    "--embedding-size", "16",
    "--hidden-size", "48",
    "--num-layers", "2",
    "--dropout", "0.2",
    "--warmup-steps", "4",
    "--eval-interval", "5",
    "--log-interval", "1",
    "--device", "cpu",
    "--precision", "fp32",
    "--threads", "1",
]  # fmt: skip


def test_resume_is_exact(tmp_path, monkeypatch):
    """Stopped by the time budget and resumed, again and again, == one uninterrupted run, step by step."""
    monkeypatch.setattr(train_module, "plot_losses", lambda *a: None)  # slow, and no part of the state
    data = corpus_slice(tmp_path / "slice.txt", 3_000)  # 5 chunks per epoch: the run wraps around twice
    assert StreamBatches(torch.zeros(2_700, dtype=torch.long), 16, 32).chunks_per_epoch == 5
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"

    assert main(["--data", str(data), "--out", str(whole), *RESUME_ARGS]) == 0

    # One step per invocation up to step 7 (through the evaluation at 5 and the epoch wrap
    # after 5), then the rest in one go.
    assert main(["--data", str(data), "--out", str(pieces), "--time-budget", "1e-9", *RESUME_ARGS]) == 0
    for step in range(2, 8):
        assert main(["--resume", str(pieces), "--time-budget", "1e-9"]) == 0
        progress = json.loads((pieces / "resume" / "train_state.json").read_text())["progress"]
        assert progress["step"] == step
    assert main(["--resume", str(pieces)]) == 0

    def losses(run: Path, kind: str, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in read_metrics(run) if r["kind"] == kind]

    whole_train = losses(whole, "train", "loss")
    assert [s for s, _ in whole_train] == list(range(1, 15))
    assert losses(pieces, "train", "loss") == whole_train  # exactly equal, not approximately
    assert losses(pieces, "train", "grad_norm") == losses(whole, "train", "grad_norm")
    assert losses(pieces, "val", "val_loss") == losses(whole, "val", "val_loss")
    for sub in ("best", "resume"):
        assert sha256_file(pieces / sub / WEIGHTS_FILE) == sha256_file(whole / sub / WEIGHTS_FILE)
    state = json.loads((pieces / "resume" / "train_state.json").read_text())["progress"]
    assert state["step"] == 14 and state["epoch"] == 2


def test_resume_after_a_kill_logs_no_step_twice(tmp_path, monkeypatch):
    """kill -9 at step 8: resume/ holds step 5 (the last evaluation) while metrics.jsonl already has
    steps 6-8 and a torn line. --resume makes the metrics those of one uninterrupted run."""
    monkeypatch.setattr(train_module, "plot_losses", lambda *a: None)
    data = corpus_slice(tmp_path / "slice.txt", 3_000)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    real_save_resume = train_module.save_resume

    def save_resume(out, model, tokenizer, optimizer, state, progress, meta):
        real_save_resume(out, model, tokenizer, optimizer, state, progress, meta)
        if progress["step"] == 5:  # what the killed run has on disk: its last save
            for sub in ("resume", "best"):
                shutil.copytree(out / sub, killed / sub)

    monkeypatch.setattr(train_module, "save_resume", save_resume)
    assert main(["--data", str(data), "--out", str(whole), *RESUME_ARGS]) == 0
    monkeypatch.setattr(train_module, "save_resume", real_save_resume)
    logged = [line for line in (whole / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 8]
    (killed / "metrics.jsonl").write_text("\n".join(logged) + '\n{"kind": "train", "st')  # died mid-write

    assert main(["--resume", str(killed)]) == 0

    def records(run: Path) -> list[dict]:  # all but the throughput, which is timing
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run)]

    assert [r["step"] for r in records(killed) if r["kind"] == "train"] == list(range(1, 15))
    assert records(killed) == records(whole)
    for sub in ("best", "resume"):
        assert sha256_file(killed / sub / WEIGHTS_FILE) == sha256_file(whole / sub / WEIGHTS_FILE)


def test_resume_reproduces_only_with_dropout_rng(tmp_path, monkeypatch):
    """Guard for the test above: with dropout, a different seed really changes the losses."""
    monkeypatch.setattr(train_module, "plot_losses", lambda *a: None)
    data = corpus_slice(tmp_path / "slice.txt", 3_000)
    args = list(RESUME_ARGS)
    args[args.index("--max-steps") + 1] = "3"
    main(["--data", str(data), "--out", str(tmp_path / "a"), *args])
    main(["--data", str(data), "--out", str(tmp_path / "b"), "--seed", "7", *args])
    a = [r["loss"] for r in read_metrics(tmp_path / "a") if r["kind"] == "train"]
    b = [r["loss"] for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert len(a) == len(b) == 3 and a != b


def test_resume_of_missing_run_fails_cleanly(tmp_path, capsys):
    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_resume_refuses_options_it_would_ignore_and_another_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "plot_losses", lambda *a: None)
    data = corpus_slice(tmp_path / "slice.txt", 3_000)
    run = tmp_path / "run"
    args = list(RESUME_ARGS)
    args[args.index("--max-steps") + 1] = "2"
    assert main(["--data", str(data), "--out", str(run), *args]) == 0
    before = sha256_file(run / "resume" / WEIGHTS_FILE)
    capsys.readouterr()

    assert main(["--resume", str(run), "--lr", "0.5", "--clip-mode", "value", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "cannot change --clip-mode, --lr" in err and "--max-steps" in err  # named, and what may change
    assert main(["--resume", str(run), "--lr", "0.002", "--max-steps", "2"]) == 0  # the value it has: fine

    text = data.read_text()
    data.write_text(text[1:] + text[0])  # same length and characters, another corpus
    assert main(["--resume", str(run), "--max-steps", "3"]) == 2
    assert "not the corpus the run was trained on" in capsys.readouterr().err
    assert sha256_file(run / "resume" / WEIGHTS_FILE) == before  # nothing was trained


def test_resume_finds_the_corpus_from_anywhere_and_knows_it_by_content(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "plot_losses", lambda *a: None)
    for sub in ("start", "elsewhere"):
        (tmp_path / sub).mkdir()
    data = corpus_slice(tmp_path / "start" / "slice.txt", 3_000).resolve()
    run = tmp_path / "run"
    args = list(RESUME_ARGS)
    args[args.index("--max-steps") + 1] = "2"
    monkeypatch.chdir(tmp_path / "start")
    assert main(["--data", "slice.txt", "--out", str(run), *args]) == 0

    def recorded() -> str:
        return json.loads((run / "resume" / META_FILE).read_text())["training"]["data"]

    assert recorded() == str(data)  # absolute, though typed relative
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["--resume", str(run), "--max-steps", "3"]) == 0

    moved = data.rename(tmp_path / "moved.txt")
    capsys.readouterr()
    assert main(["--resume", str(run), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(data) in err and "pass --data" in err  # one line, no traceback

    assert main(["--resume", str(run), "--max-steps", "4", "--data", "../moved.txt"]) == 0  # same content
    assert recorded() == str(moved)
    text = moved.read_text()
    (tmp_path / "other.txt").write_text(text[1:] + text[0])
    capsys.readouterr()
    assert main(["--resume", str(run), "--max-steps", "5", "--data", "../other.txt"]) == 2
    assert "not the corpus the run was trained on" in capsys.readouterr().err
    assert json.loads((run / "resume" / "train_state.json").read_text())["progress"]["step"] == 4


def test_resume_into_another_directory_carries_the_best_checkpoint_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "plot_losses", lambda *a: None)
    data = corpus_slice(tmp_path / "slice.txt", 3_000)
    a, b = tmp_path / "a", tmp_path / "b"
    args = list(RESUME_ARGS)
    args[args.index("--max-steps") + 1] = "6"
    assert main(["--data", str(data), "--out", str(a), "--time-budget", "1e-9", *args]) == 0
    for _ in range(4):  # to step 5: its evaluation writes a/best
        assert main(["--resume", str(a), "--time-budget", "1e-9"]) == 0
    assert (a / "best").is_dir()
    assert main(["--resume", str(a), "--out", str(b)]) == 0
    assert (b / "best" / WEIGHTS_FILE).is_file()
    steps = [r["step"] for r in read_metrics(b) if r["kind"] == "train"]
    assert steps == list(range(1, 7))  # the whole history, not only the resumed steps


def grads_of_tiny_model(scale: float) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=11, embedding_size=8, hidden_size=16, num_layers=2))
    tokens = torch.randint(0, 11, (4, 20))
    logits, _ = model(tokens)
    loss = scale * F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, dims=1).flatten())
    loss.backward()
    return list(model.parameters())


def total_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def test_clip_norm_bounds_global_norm_and_returns_preclip_norm():
    params = grads_of_tiny_model(scale=100.0)
    before = total_norm(params)
    bound = 0.5
    assert before > 10 * bound
    returned = clip_gradients(params, "norm", bound)
    assert isinstance(returned, float)
    assert returned == pytest.approx(before, rel=1e-5)
    assert total_norm(params) <= bound + 1e-6
    assert total_norm(params) == pytest.approx(bound, rel=1e-4)  # scaled, not zeroed


def test_clip_norm_leaves_small_gradients_alone():
    params = grads_of_tiny_model(scale=1e-3)
    saved = [p.grad.clone() for p in params]
    before = total_norm(params)
    assert clip_gradients(params, "norm", 10.0) == pytest.approx(before, rel=1e-5)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, saved, strict=True))


def test_clip_value_bounds_every_element_and_returns_preclip_norm():
    params = grads_of_tiny_model(scale=100.0)
    before = total_norm(params)
    bound = 0.01
    saved = [p.grad.clone() for p in params]
    assert max(float(g.abs().max()) for g in saved) > bound
    returned = clip_gradients(params, "value", bound)
    assert returned == pytest.approx(before, rel=1e-5)
    for p, g in zip(params, saved, strict=True):
        assert float(p.grad.abs().max()) <= bound
        assert torch.equal(p.grad, g.clamp(-bound, bound))


def test_clip_skips_parameters_without_grad():
    params = grads_of_tiny_model(scale=100.0)
    params[0].grad = None
    before = total_norm(params)
    assert clip_gradients(params, "norm", 0.1) == pytest.approx(before, rel=1e-5)
    assert params[0].grad is None


def test_stream_batches_are_contiguous_streams():
    ids = torch.arange(1000)
    b = StreamBatches(ids, batch=4, bptt=10)
    length = 999 // 4
    assert b.chunks_per_epoch == length // 10
    x0, y0 = b.chunk(0)
    x1, _ = b.chunk(1)
    assert x0.shape == y0.shape == (4, 10)
    assert torch.equal(y0, x0 + 1)  # targets are the next characters
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # chunk i+1 continues chunk i in every stream
    assert torch.equal(x0[:, 0], torch.arange(4) * length)  # streams start evenly spaced
    with pytest.raises(ValueError, match="too short"):
        StreamBatches(torch.arange(30), batch=4, bptt=10)


def help_blocks() -> dict[str, str]:
    """option name -> its help entry with whitespace collapsed."""
    text = build_parser().format_help()
    options = text.split("options:", 1)[1]
    blocks: dict[str, str] = {}
    current = None
    for line in options.splitlines():
        m = re.match(r"^  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            blocks[current] = line
        elif current is not None:
            blocks[current] += " " + line
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def test_help_lists_every_option_with_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal width
    blocks = help_blocks()
    names = [f.name for f in fields(TrainArgs)]
    assert len(names) >= 20
    for f in fields(TrainArgs):
        option = "--" + f.name.replace("_", "-")
        assert option in blocks, option
        assert f"(default: {f.default})" in blocks[option], (option, blocks[option])
    assert set(blocks) == {"-h"} | {"--" + n.replace("_", "-") for n in names}


def test_parse_args_defaults_and_given():
    args, given = parse_args([])
    assert args == TrainArgs() and given == set()
    args, given = parse_args(["--hidden-size", "64", "--lr", "0.01", "--cell-type", "gru", "--seed", "1337"])
    assert (args.hidden_size, args.lr, args.cell_type) == (64, 0.01, "gru")
    assert given == {"hidden_size", "lr", "cell_type", "seed"}  # seed typed even though equal to the default
    with pytest.raises(SystemExit):
        parse_args(["--clip-mode", "sideways"])


def test_lr_schedule_endpoints():
    args = TrainArgs(lr=1e-2, min_lr=1e-3, warmup_steps=10, max_steps=110)
    assert lr_at(0, args) == pytest.approx(1e-3)  # lr * 1/warmup
    assert lr_at(4, args) == pytest.approx(5e-3)
    assert lr_at(9, args) == pytest.approx(1e-2)  # end of warmup: peak
    assert lr_at(10, args) == pytest.approx(1e-2)  # start of cosine: peak
    assert lr_at(60, args) == pytest.approx((1e-2 + 1e-3) / 2)  # halfway down
    assert lr_at(110, args) == pytest.approx(1e-3)  # end: min_lr
    assert lr_at(500, args) == pytest.approx(1e-3)  # stays there
    warm = [lr_at(s, args) for s in range(10)]
    decay = [lr_at(s, args) for s in range(10, 111)]
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False))
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert all(1e-3 - 1e-12 <= v <= 1e-2 + 1e-12 for v in warm + decay)


def test_lr_schedule_without_warmup():
    args = TrainArgs(lr=2e-3, min_lr=2e-4, warmup_steps=0, max_steps=100)
    assert lr_at(0, args) == pytest.approx(2e-3)
    assert lr_at(100, args) == pytest.approx(2e-4)


def test_sigterm_saves_resume_state_and_exits_cleanly(tmp_path: Path) -> None:
    """A long run stopped by SIGTERM saves where it was; --resume continues from there."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "corpus.txt"
    data.write_text((Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "model.train", "--data", str(data), "--out", str(out), "--max-steps", "100000",
         "--hidden-size", "32", "--embedding-size", "8", "--batch-size", "8", "--bptt", "16",
         "--eval-interval", "100000", "--log-interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 5) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "interrupted at step" in output
    saved = json.loads((out / "resume" / "train_state.json").read_text())["progress"]["step"]
    assert 5 <= saved < 100000


@pytest.mark.parametrize("option", [
    ["--clip", "-1"], ["--clip", "0"], ["--bptt", "0"], ["--eval-interval", "0"], ["--log-interval", "0"],
    ["--max-steps", "0"], ["--hidden-size", "0"], ["--dropout", "1.0"], ["--lr", "nan"],
    ["--min-lr", "1", "--lr", "0.1"],
])
def test_options_out_of_range_are_usage_errors(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A negative --clip trained by gradient ascent (val loss 15 nats/char) and finished "done";
    others failed mid-run with a ZeroDivisionError or a traceback."""
    from model.train import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--out", "/nonexistent/run", *option])
    assert e.value.code == 2
    assert f"{option[0]}" in capsys.readouterr().err

"""The checkpoint format: round trip, metadata, and every way a checkpoint is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    model_identity,
    read_meta,
    save_checkpoint,
    sha256_file,
    write_dir_atomically,
)
from model.model import CharRNN, ModelConfig
from model.tokenizer import CharTokenizer

TEXT = "hello world, said the checkpoint.\n"
EXTRA = {"best_val_loss": 1.2345, "steps": 17, "note": "tested"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(cell_type: str = "lstm") -> tuple[CharRNN, CharTokenizer]:
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(TEXT)
    config = ModelConfig(
        vocab_size=len(tok), embedding_size=8, hidden_size=16, num_layers=2, dropout=0.1, cell_type=cell_type
    )
    return CharRNN(config).eval(), tok


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    model, tok = make()
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, model, tok, EXTRA)
    return directory


def edit_meta(directory: Path, change) -> None:
    path = directory / META_FILE
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def refused(directory: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
def test_save_then_load_gives_identical_logits(tmp_path, cell_type):
    model, tok = make(cell_type)
    save_checkpoint(tmp_path / "c", model, tok, EXTRA)
    loaded = load_checkpoint(tmp_path / "c")

    assert loaded.config == model.config
    assert loaded.tokenizer.vocab == tok.vocab
    assert loaded.path == tmp_path / "c"
    assert not loaded.model.training
    tokens = torch.tensor([tok.encode(TEXT)] * 2)
    with torch.no_grad():
        want_logits, want_state = model(tokens)
        got_logits, got_state = loaded.model(tokens)
    assert torch.equal(want_logits, got_logits)
    if cell_type == "lstm":
        assert all(torch.equal(a, b) for a, b in zip(want_state, got_state, strict=True))
    else:
        assert torch.equal(want_state, got_state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name


def test_model_json_fields(ckpt):
    meta = json.loads((ckpt / META_FILE).read_text())
    for field in ("format", "format_version", "config", "vocab", "weights_sha256", "torch_version", "created"):
        assert field in meta, field
    model, tok = make()
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["config"] == model.config.to_dict()
    assert meta["vocab"] == tok.vocab
    assert meta["weights_sha256"] == sha256_file(ckpt / WEIGHTS_FILE)
    assert len(meta["weights_sha256"]) == 64
    assert meta["torch_version"] == torch.__version__
    assert meta["created"].endswith("Z") and meta["created"][:2] == "20"
    for key, value in EXTRA.items():
        assert meta[key] == value
    assert sorted(p.name for p in ckpt.iterdir()) == [META_FILE, WEIGHTS_FILE]

    loaded = load_checkpoint(ckpt)
    assert loaded.meta == meta
    assert loaded.sha256 == model_identity(meta) != meta["weights_sha256"]


def test_the_identity_covers_the_vocabulary_and_config_not_only_the_weights(ckpt):
    """Swapping two characters of the vocabulary keeps the weights' hash but is another model."""
    before = load_checkpoint(ckpt).sha256
    def swap(meta):
        vocab = meta["vocab"]
        vocab[0], vocab[1] = vocab[1], vocab[0]
    edit_meta(ckpt, swap)
    after = load_checkpoint(ckpt)
    assert after.meta["weights_sha256"] == read_meta(ckpt)["weights_sha256"]
    assert after.sha256 != before
    edit_meta(ckpt, swap)
    assert load_checkpoint(ckpt).sha256 == before


def test_weights_are_float32_safetensors(ckpt):
    weights = load_file(str(ckpt / WEIGHTS_FILE))
    model, _ = make()
    assert set(weights) == set(model.state_dict())
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_load_to_other_dtype(ckpt):
    loaded = load_checkpoint(ckpt, dtype=torch.float64)
    assert loaded.model.head.weight.dtype == torch.float64
    assert loaded.model.zero_state(1)[0].dtype == torch.float64


def test_refuses_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    refused(missing, str(missing), "does not exist")


def test_refuses_missing_model_json(ckpt):
    (ckpt / META_FILE).unlink()
    refused(ckpt, str(ckpt / META_FILE), "missing")


def test_refuses_missing_weights(ckpt):
    (ckpt / WEIGHTS_FILE).unlink()
    refused(ckpt, str(ckpt / WEIGHTS_FILE), "missing")


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_refuses_unknown_format_version(ckpt, version):
    edit_meta(ckpt, lambda m: m.update(format_version=version))
    refused(ckpt, str(ckpt / META_FILE), "unknown format version", repr(version))


def test_refuses_meta_that_is_not_json_or_not_ours(ckpt):
    (ckpt / META_FILE).write_text("{not json")
    refused(ckpt, str(ckpt / META_FILE), "not valid JSON")
    (ckpt / META_FILE).write_text(json.dumps({"format": "something-else", "format_version": FORMAT_VERSION}))
    refused(ckpt, str(ckpt / META_FILE), "not an lstm-serve checkpoint")


@pytest.mark.parametrize("field", ["config", "vocab", "weights_sha256"])
def test_refuses_meta_missing_a_field(ckpt, field):
    edit_meta(ckpt, lambda m: m.pop(field))
    refused(ckpt, str(ckpt / META_FILE), repr(field))


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("hidden_size", 32, "has shape"),
        ("embedding_size", 4, "has shape"),
        ("num_layers", 3, "missing"),
        ("cell_type", "gru", "has shape"),  # GRU has 3 gate blocks where the LSTM has 4
    ],
)
def test_refuses_config_that_does_not_match_weights(ckpt, key, value, fragment):
    edit_meta(ckpt, lambda m: m["config"].update({key: value}))
    refused(ckpt, str(ckpt / WEIGHTS_FILE), "config in model.json", fragment)


@pytest.mark.parametrize(
    ("key", "value"),
    [("hidden_size", "16"), ("hidden_size", 16.0), ("num_layers", True), ("dropout", "0.1"), ("cell_type", "rnn")],
)
def test_refuses_config_of_wrong_type(ckpt, key, value):
    edit_meta(ckpt, lambda m: m["config"].update({key: value}))
    refused(ckpt, str(ckpt / META_FILE), "invalid config", key)


def test_refuses_unknown_config_key(ckpt):
    edit_meta(ckpt, lambda m: m["config"].update(extra_layers=1))
    refused(ckpt, str(ckpt / META_FILE), "extra_layers")


def test_refuses_flipped_byte_in_weights(ckpt):
    path = ckpt / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused(ckpt, str(path), "SHA-256", "does not match")


def _replace_weights(ckpt: Path, content: bytes) -> None:
    """Tamper with the weights and record the new hash, so only the content check can catch it."""
    path = ckpt / WEIGHTS_FILE
    path.write_bytes(content)
    digest = sha256_file(path)
    edit_meta(ckpt, lambda m: m.update(weights_sha256=digest))


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "header-only"])
def test_refuses_unreadable_weights_even_with_matching_hash(ckpt, how):
    original = (ckpt / WEIGHTS_FILE).read_bytes()
    content = {
        "truncated": original[: len(original) // 2],
        "garbage": bytes(range(256)) * 8,
        "empty": b"",
        "header-only": original[:12],
    }[how]
    _replace_weights(ckpt, content)
    refused(ckpt, str(ckpt / WEIGHTS_FILE), "unreadable safetensors file")


def _rewrite_weights(ckpt: Path, change) -> None:
    weights = load_file(str(ckpt / WEIGHTS_FILE))
    change(weights)
    tmp = ckpt / "tmp.safetensors"
    save_file(weights, str(tmp))
    content = tmp.read_bytes()
    tmp.unlink()
    _replace_weights(ckpt, content)


def test_refuses_non_finite_weights(ckpt):
    _rewrite_weights(ckpt, lambda w: w["head.bias"].__setitem__(0, float("nan")))
    refused(ckpt, str(ckpt / WEIGHTS_FILE), "'head.bias'", "not finite")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn, torch.complex64])
def test_refuses_weights_of_wrong_dtype(ckpt, dtype):
    def change(w):
        w["head.bias"] = w["head.bias"].to(dtype)

    _rewrite_weights(ckpt, change)
    refused(ckpt, str(ckpt / WEIGHTS_FILE), "'head.bias'")


def test_refuses_extra_or_missing_tensors(ckpt):
    _rewrite_weights(ckpt, lambda w: w.update(stowaway=torch.zeros(1)))
    refused(ckpt, str(ckpt / WEIGHTS_FILE), "stowaway")
    _rewrite_weights(ckpt, lambda w: (w.pop("stowaway"), w.pop("head.weight")))
    refused(ckpt, str(ckpt / WEIGHTS_FILE), "head.weight")


@pytest.mark.parametrize("vocab_change", ["drop", "add"])
def test_refuses_vocab_size_mismatch(ckpt, vocab_change):
    def change(meta):
        if vocab_change == "drop":
            meta["vocab"] = meta["vocab"][:-1]
        else:
            meta["vocab"] = [*meta["vocab"], "\u2603"]

    edit_meta(ckpt, change)
    n = len(set(TEXT))
    have = n - 1 if vocab_change == "drop" else n + 1
    refused(ckpt, str(ckpt / META_FILE), f"vocabulary has {have} characters", f"vocab_size is {n}")


def test_refuses_duplicate_vocab(ckpt):
    edit_meta(ckpt, lambda m: m.update(vocab=[m["vocab"][0]] * len(m["vocab"])))
    refused(ckpt, str(ckpt / META_FILE), "duplicate")


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_atomic_write_failure_leaves_old_directory_intact(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    (target / "b.txt").write_text("old b")

    def fill(tmp: Path) -> None:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dir_atomically(target, fill)
    assert (target / "a.txt").read_text() == "old"
    assert (target / "b.txt").read_text() == "old b"
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_failure_without_old_directory(tmp_path):
    def fill(tmp: Path) -> None:
        (tmp / "x").write_text("partial")
        raise KeyboardInterrupt  # BaseException too

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(tmp_path / "fresh", fill)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    write_dir_atomically(target, lambda tmp: (tmp / "a.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_text() == "new"
    assert leftovers(tmp_path, "out") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_keeps_previous_checkpoint_loadable(ckpt, monkeypatch):
    before = load_checkpoint(ckpt).sha256
    model, tok = make()
    with torch.no_grad():
        model.head.bias.add_(1.0)

    import model.checkpoint as checkpoint_module

    def broken_save_file(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(ckpt, model, tok, EXTRA)
    monkeypatch.undo()
    assert load_checkpoint(ckpt).sha256 == before
    assert leftovers(ckpt.parent, ckpt.name) == []

    save_checkpoint(ckpt, model, tok, EXTRA)
    loaded = load_checkpoint(ckpt)
    assert loaded.sha256 != before
    assert torch.equal(loaded.model.head.bias, model.head.bias)
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt"]


# A child process that writes `target` anew and dies at a chosen moment, like a kill -9.
CRASHING_WRITER = r"""
import os, shutil, sys
from pathlib import Path
import model.checkpoint as C

moment = sys.argv[2]
real_rename = os.rename
def rename(src, dst):
    real_rename(src, dst)
    if ".old-" in str(dst):  # the fallback moved the old directory aside
        os._exit(99 if moment == "after-exchange" else 137)
os.rename = rename
if moment == "after-exchange":
    shutil.rmtree = lambda *a, **k: os._exit(137)  # dies before removing the swapped-out old one
else:
    C._exchange = lambda a, b: False  # a system without renameat2(RENAME_EXCHANGE)
C.write_dir_atomically(Path(sys.argv[1]), lambda tmp: (tmp / "a.txt").write_text("new"))
"""


def crash_while_writing(target: Path, moment: str) -> int:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(target), moment], cwd=root).returncode


def test_atomic_write_exchanges_so_a_crash_never_leaves_the_target_missing(tmp_path):
    import model.checkpoint as checkpoint_module

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    # Linux with glibc >= 2.28 on the usual filesystems (ext4, xfs, tmpfs, overlayfs): the path CI takes.
    assert checkpoint_module._exchange(a, b), "no renameat2(RENAME_EXCHANGE) here: the fallback is all there is"
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")

    # Killed right after the swap: the target is already the new directory, never absent
    # (the child exits 99 instead if it ever renamed the target aside).
    assert crash_while_writing(target, "after-exchange") == 137
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_text() == "new"
    [swapped_out] = leftovers(tmp_path, "out")
    assert swapped_out.startswith(".out.tmp-")  # the old one, not yet removed
    assert (tmp_path / swapped_out / "a.txt").read_text() == "old"


def test_a_crash_between_the_fallback_renames_is_undone_by_the_loader(ckpt):
    before = load_checkpoint(ckpt).sha256
    assert crash_while_writing(ckpt, "between-renames") == 137
    assert not ckpt.exists()  # the old one is .ckpt.old-*, the new one .ckpt.tmp-*
    assert [name.split("-")[0] for name in leftovers(ckpt.parent, "ckpt")] == [".ckpt.old", ".ckpt.tmp"]

    assert load_checkpoint(ckpt).sha256 == before  # the old complete checkpoint took its name back
    assert [name.split("-")[0] for name in leftovers(ckpt.parent, "ckpt")] == [".ckpt.tmp"]


def test_a_crash_between_the_fallback_renames_is_undone_by_the_next_write(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    assert crash_while_writing(target, "between-renames") == 137
    assert not target.exists()

    def fill(tmp: Path) -> None:
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dir_atomically(target, fill)
    assert (target / "a.txt").read_text() == "old"  # restored before the write began
    assert [name.split("-")[0] for name in leftovers(tmp_path, "out")] == [".out.tmp"]  # the crashed write's

    # And the fallback itself still replaces the directory whole.
    import model.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "_exchange", lambda a, b: False)
    write_dir_atomically(target, lambda tmp: (tmp / "b.txt").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [name.split("-")[0] for name in leftovers(tmp_path, "out")] == [".out.tmp"]  # nothing new

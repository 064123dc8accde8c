"""The checkpoint format: a directory that describes itself.

    model.safetensors  weights (no pickle anywhere on the load path)
    model.json         format version, architecture, vocabulary, training arguments,
                       SHA-256 of the corpus and of the weights file, best validation
                       loss, steps, tokens seen, wall time, torch version, created time

Directories are written atomically (a temporary sibling, then an atomic exchange or
rename), and the loader validates everything before a single weight reaches the model.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.model import CharRNN, ModelConfig
from model.tokenizer import CharTokenizer

FORMAT_NAME = "lstm-serve-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"

# Weight dtypes the loader accepts (save_checkpoint writes float32). Not every floating
# dtype safetensors can hold: torch.isfinite is not implemented for some float8/float4 types.
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# The checkpoint the server loads when none is named.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# renameat2(2) on Linux: RENAME_EXCHANGE swaps two existing paths in one atomic step.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@cache
def _renameat2() -> Any:
    """libc's renameat2, or None where there is none (other OS, glibc < 2.28, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap a and b atomically; False where the OS or the filesystem cannot (then nothing moved)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def restore_moved_aside(target: Path) -> None:
    """Undo a crash between the fallback's two renames: a `.NAME.old-*` sibling and no NAME.

    The old directory was complete when it was moved aside, so it takes its name back.
    """
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        try:
            os.rename(olds[-1], target)
        except OSError:  # another process restored or wrote it meanwhile, or a read-only mount
            pass


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` survive a power loss (the files were synced before it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename still happened
        pass
    finally:
        os.close(fd)


def write_dir_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Call fill(tmp_dir) to populate a temporary sibling of target, then swap it into place.

    A crash at any moment leaves either the old complete directory or the new one. On Linux
    the two are exchanged in one renameat2(RENAME_EXCHANGE) and target never disappears;
    elsewhere the old one is renamed aside before the new one takes its name, and a crash
    between the two renames is undone by restore_moved_aside (here and in the loader).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_moved_aside(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a checkpoint is read by other users (containers)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if not target.exists():
            os.rename(tmp, target)
            _fsync_dir(target.parent)
        elif _exchange(tmp, target):
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        else:
            old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(target, old)
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        restore_moved_aside(target)  # an error between the fallback's renames
        raise


def save_checkpoint(
    directory: Path | str,
    model: CharRNN,
    tokenizer: CharTokenizer,
    extra_meta: dict[str, Any],
) -> None:
    """Write model.safetensors + model.json into `directory`, atomically."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "vocab": tokenizer.vocab,
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra_meta,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    write_dir_atomically(Path(directory), fill)


@dataclass
class Checkpoint:
    model: CharRNN  # in eval mode, on the requested device and dtype
    tokenizer: CharTokenizer  # the vocabulary stored with the weights
    meta: dict[str, Any]  # the whole model.json
    path: Path  # the directory it was loaded from

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def sha256(self) -> str:
        """Identity of the served model: the SHA-256 of the weights' SHA-256, the config and the
        vocabulary. Not the weights alone: the same weights read with another vocabulary (an
        edited model.json) are another model, and stored sessions must not cross between them."""
        return model_identity(self.meta)


def model_identity(meta: dict[str, Any]) -> str:
    described = json.dumps(
        {"weights_sha256": meta["weights_sha256"], "config": meta["config"], "vocab": meta["vocab"]},
        sort_keys=True, ensure_ascii=True, separators=(",", ":"),
    )
    return hashlib.sha256(described.encode("ascii")).hexdigest()


def read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / META_FILE
    if not directory.is_dir():
        restore_moved_aside(directory)
    if not directory.is_dir():
        what = "is a file, not a checkpoint directory" if directory.exists() else "checkpoint directory does not exist"
        raise CheckpointError(f"{directory}: {what}")
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing (a checkpoint needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path}: not an lstm-serve checkpoint (format must be {FORMAT_NAME!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: unknown format version {meta.get('format_version')!r}"
            f" (this build reads version {FORMAT_VERSION})"
        )
    for key in ("config", "vocab", "weights_sha256"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: missing field {key!r}")
    return meta


def load_checkpoint(
    directory: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Checkpoint:
    directory = Path(directory)
    meta = read_meta(directory)
    meta_path = directory / META_FILE
    weights_path = directory / WEIGHTS_FILE
    try:
        config = ModelConfig.from_dict(meta["config"])
        tokenizer = CharTokenizer(meta["vocab"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: invalid config or vocabulary ({e})") from None
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(
            f"{meta_path}: vocabulary has {len(tokenizer)} characters but config.vocab_size is {config.vocab_size}"
        )
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    actual_sha = sha256_file(weights_path)
    if actual_sha != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights_path}: SHA-256 {actual_sha} does not match {meta['weights_sha256']} recorded in "
            f"{META_FILE} (the file is corrupt or was modified)"
        )
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({e})") from None
    model = CharRNN(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: weights do not match the config in {META_FILE}"
            f" (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)},"
                f" the config in {META_FILE} needs {tuple(expected[name].shape)}"
            )
        if tensor.dtype not in _WEIGHT_DTYPES or not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights_path}: tensor {name!r} is not finite floating point")
    model.load_state_dict(weights)
    model.to(device=device, dtype=dtype).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, meta=meta, path=directory)

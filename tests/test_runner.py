"""The model runner's state slots, unit-tested on the tiny checkpoints (no server)."""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import Checkpoint, load_checkpoint
from model.model import CharRNN, ModelConfig
from model.tokenizer import CharTokenizer
from service.runner import CELL_KERNEL_MAX_BATCH, M_MMAP_THRESHOLD, ModelRunner, RowInput


@pytest.mark.parametrize("which", ["tiny_checkpoint", "tiny_gru_checkpoint"])
def test_read_states_is_read_state_of_each_slot(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    runner = ModelRunner(load_checkpoint(path), torch.device("cpu"), initial_capacity=4)
    slots = [runner.allocate() for _ in range(6)]  # grows the slab past its first capacity
    runner.execute([RowInput(slot=s, tokens=[i + 1] * (i + 1), position=0) for i, s in enumerate(slots)])
    picked = [slots[4], slots[0], slots[2]]
    together = runner.read_states(picked)
    assert len(together) == 3
    for slot, state in zip(picked, together):
        alone = runner.read_state(slot)
        assert len(state) == len(alone) == len(runner.slabs)
        for a, b in zip(state, alone):
            assert a.shape == b.shape and a.flags["C_CONTIGUOUS"]
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(together[0][0], together[1][0])  # different sessions, different states
    assert runner.read_states([]) == []


def test_write_state_refuses_a_state_of_another_shape(tiny_checkpoint: Path) -> None:
    runner = ModelRunner(load_checkpoint(tiny_checkpoint), torch.device("cpu"), initial_capacity=2)
    slot = runner.allocate()
    layers, hidden = runner.config.num_layers, runner.config.hidden_size
    one_layer = [np.ones((1, hidden), np.float32)] * len(runner.slabs)  # would broadcast into every layer
    with pytest.raises(ValueError, match="shape"):
        runner.write_state(slot, one_layer)
    assert all(not np.any(part) for part in runner.read_state(slot))  # nothing written
    good = [np.full((layers, hidden), 0.5, np.float32)] * len(runner.slabs)
    runner.write_state(slot, good)
    np.testing.assert_array_equal(runner.read_state(slot)[0], good[0])


def test_large_outputs_do_not_hold_the_whole_batch(tiny_checkpoint: Path) -> None:
    """An answer waiting for a client that does not read must keep only its own rows alive."""
    runner = ModelRunner(load_checkpoint(tiny_checkpoint), torch.device("cpu"), initial_capacity=4)
    slots = [runner.allocate() for _ in range(3)]
    outs = runner.execute([RowInput(slot=s, tokens=[1, 2, 3], position=0, top_k=2, want_logprobs=True,
                                    want_hidden=True) for s in slots])
    for out in outs:
        assert out.logprobs is not None and out.hidden is not None
        assert out.logprobs.base is None and out.hidden.base is None  # own copies, not views of the batch
        assert out.logprobs.shape[0] == out.hidden.shape[0] == 3
    np.testing.assert_allclose(np.exp(outs[0].logprobs).sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("which", ["tiny_checkpoint", "tiny_gru_checkpoint"])
def test_cell_kernels_and_sequence_kernel_agree(which: str, request: pytest.FixtureRequest) -> None:
    """Single-token steps take the per-layer cells up to CELL_KERNEL_MAX_BATCH sessions and
    nn.LSTM/nn.GRU above it: a performance choice only, so both give the same outputs and states."""
    path: Path = request.getfixturevalue(which)
    checkpoint = load_checkpoint(path)
    n = CELL_KERNEL_MAX_BATCH
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, checkpoint.config.vocab_size, 5).tolist() for _ in range(n + 1)]
    outputs = {}
    for batch in (n, n + 1):  # the cells, then the sequence kernel, for the same first n sessions
        runner = ModelRunner(checkpoint, torch.device("cpu"), initial_capacity=n + 1)
        slots = [runner.allocate() for _ in range(batch)]
        steps = []
        for t in range(5):  # token by token, so the state carried between steps goes through both too
            rows = [RowInput(slot=s, tokens=[prompts[i][t]], position=t, top_k=3, want_logprobs=True)
                    for i, s in enumerate(slots)]
            steps.append([out.logprobs for out in runner.execute(rows)[:n]])
        outputs[batch] = (steps, runner.read_states(slots[:n]))
    for cell_step, seq_step in zip(outputs[n][0], outputs[n + 1][0]):
        for a, b in zip(cell_step, seq_step):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a_state, b_state in zip(outputs[n][1], outputs[n + 1][1]):
        for a, b in zip(a_state, b_state):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_steps_keep_their_memory_instead_of_faulting_it_in_anew() -> None:
    """A step of 256 sessions on the reference shape (2 x 512) allocates and frees ~14 MB. glibc is first put
    back to its start-up mmap threshold (128 KiB), where a process can be left by its history and every such
    block is mapped and faulted in afresh (~3,300 page faults per step); the runner's thresholds keep them."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    vocab = [chr(32 + i) for i in range(65)]
    model = CharRNN(ModelConfig(vocab_size=65, embedding_size=128, hidden_size=512, num_layers=2)).eval()
    runner = ModelRunner(Checkpoint(model, CharTokenizer(vocab), {}, Path(".")), torch.device("cpu"),
                         initial_capacity=256)
    rows = [RowInput(slot=runner.allocate(), tokens=[i % 65], position=0, top_k=5) for i in range(256)]
    for _ in range(3):
        runner.execute(rows)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        runner.execute(rows)
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert faults_per_step < 300, faults_per_step

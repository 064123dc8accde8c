"""The model runner's state slots, unit-tested on the tiny checkpoints (no server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from service.runner import ModelRunner, RowInput


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

"""The model: fused cells == the equations, whole sequence == one step at a time, state shapes."""

from __future__ import annotations

import pytest
import torch

from model.model import CharRNN, ModelConfig, count_parameters, detach_state
from model.reference import gru_reference, lstm_reference

TOL = 1e-5
STEPS = 300
LAYERS = 3


@pytest.fixture(autouse=True)
def _one_thread():
    # The machine may be busy; small tensors are fastest on one thread anyway.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(cell_type: str, *, layers: int = LAYERS, seed: int = 0) -> CharRNN:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=13, embedding_size=12, hidden_size=24, num_layers=layers, cell_type=cell_type)
    return CharRNN(config).eval()


def random_state(model: CharRNN, batch: int, scale: float = 0.8):
    shape = (model.config.num_layers, batch, model.config.hidden_size)
    if model.config.cell_type == "lstm":
        return (scale * torch.randn(shape), scale * torch.randn(shape))
    return scale * torch.randn(shape)


def clone_state(state):
    return tuple(s.clone() for s in state) if isinstance(state, tuple) else state.clone()


def max_diff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(max_diff(x, y) for x, y in zip(a, b, strict=True))
    return float((a - b).abs().max())


@torch.no_grad()
def test_fused_lstm_matches_reference_equations():
    model = make_model("lstm")
    torch.manual_seed(1)
    x = torch.randn(2, STEPS, model.config.embedding_size)
    state = random_state(model, 2)
    saved = clone_state(state)

    fused_out, (fused_h, fused_c) = model.rnn(x, state)
    ref_out, (ref_h, ref_c) = lstm_reference(model.rnn, x, state)
    ref_h, ref_c = torch.stack(list(ref_h)), torch.stack(list(ref_c))

    assert fused_out.shape == ref_out.shape == (2, STEPS, model.config.hidden_size)
    assert fused_h.shape == ref_h.shape == fused_c.shape == ref_c.shape == (LAYERS, 2, model.config.hidden_size)
    assert max_diff(fused_out, ref_out) <= TOL
    assert max_diff(fused_h, ref_h) <= TOL
    assert max_diff(fused_c, ref_c) <= TOL
    # The reference must not write into the caller's state.
    assert max_diff(state, saved) == 0.0

    # The comparison is sensitive: the initial state and every layer's weights matter.
    zero_out, _ = model.rnn(x, None)
    assert max_diff(zero_out[:, 0], ref_out[:, 0]) > 1e-3
    model.rnn.weight_hh_l0[0, 0] += 0.1
    perturbed_out, _ = lstm_reference(model.rnn, x, state)
    assert max_diff(perturbed_out, fused_out) > TOL


@torch.no_grad()
def test_fused_gru_matches_reference_equations():
    model = make_model("gru")
    torch.manual_seed(2)
    x = torch.randn(2, STEPS, model.config.embedding_size)
    state = random_state(model, 2)
    saved = state.clone()

    fused_out, fused_h = model.rnn(x, state)
    ref_out, ref_h = gru_reference(model.rnn, x, state)

    assert fused_out.shape == ref_out.shape == (2, STEPS, model.config.hidden_size)
    assert fused_h.shape == ref_h.shape == (LAYERS, 2, model.config.hidden_size)
    assert max_diff(fused_out, ref_out) <= TOL
    assert max_diff(fused_h, ref_h) <= TOL
    assert torch.equal(state, saved)

    zero_out, _ = model.rnn(x, None)
    assert max_diff(zero_out[:, 0], ref_out[:, 0]) > 1e-3
    model.rnn.weight_hh_l0[0, 0] += 0.1
    perturbed_out, _ = gru_reference(model.rnn, x, state)
    assert max_diff(perturbed_out, fused_out) > TOL


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
@torch.no_grad()
def test_whole_sequence_equals_step_by_step(cell_type):
    model = make_model(cell_type)
    torch.manual_seed(3)
    batch, steps = 3, 60
    tokens = torch.randint(0, model.config.vocab_size, (batch, steps))
    initial = random_state(model, batch)

    whole_logits, whole_state = model(tokens, initial)

    state = initial
    step_logits = []
    for t in range(steps):
        logits, state = model(tokens[:, t : t + 1], state)
        assert logits.shape == (batch, 1, model.config.vocab_size)
        step_logits.append(logits)
    step_logits = torch.cat(step_logits, dim=1)

    assert whole_logits.shape == (batch, steps, model.config.vocab_size)
    assert max_diff(whole_logits, step_logits) <= TOL
    assert max_diff(whole_state, state) <= TOL

    # Splitting the sequence anywhere and carrying the state gives the same result too.
    first, mid_state = model(tokens[:, :17], initial)
    second, end_state = model(tokens[:, 17:], mid_state)
    assert max_diff(torch.cat([first, second], dim=1), whole_logits) <= TOL
    assert max_diff(end_state, whole_state) <= TOL

    # state=None means zeros, and a non-zero state changes the output.
    none_logits, _ = model(tokens, None)
    zero_logits, _ = model(tokens, model.zero_state(batch))
    assert torch.equal(none_logits, zero_logits)
    assert max_diff(none_logits[:, 0], whole_logits[:, 0]) > 1e-4


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
def test_state_shapes(cell_type):
    model = make_model(cell_type, layers=2)
    hidden = model.config.hidden_size
    zero = model.zero_state(5)
    logits, state = model(torch.zeros(5, 7, dtype=torch.long), None)
    assert logits.shape == (5, 7, model.config.vocab_size)
    if cell_type == "lstm":
        assert model.config.state_tensors == 2
        for s in (zero, state):
            assert isinstance(s, tuple) and len(s) == 2
            h, c = s
            assert h.shape == c.shape == (2, 5, hidden)
        assert all(float(t.abs().max()) == 0.0 for t in zero)
    else:
        assert model.config.state_tensors == 1
        for s in (zero, state):
            assert isinstance(s, torch.Tensor)
            assert s.shape == (2, 5, hidden)
        assert float(zero.abs().max()) == 0.0
    out, _ = model.forward_hidden(torch.zeros(5, 7, dtype=torch.long))
    assert out.shape == (5, 7, hidden)


def test_zero_state_follows_model_dtype():
    model = make_model("lstm", layers=1).to(torch.float64)
    h, c = model.zero_state(2)
    assert h.dtype == c.dtype == torch.float64
    assert model.zero_state(2, dtype=torch.float32)[0].dtype == torch.float32


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
def test_detach_state_cuts_the_graph(cell_type):
    model = make_model(cell_type, layers=1).train()
    _, state = model(torch.zeros(2, 3, dtype=torch.long))
    parts = state if isinstance(state, tuple) else (state,)
    assert all(p.requires_grad for p in parts)
    detached = detach_state(state)
    assert type(detached) is type(state)
    parts_d = detached if isinstance(detached, tuple) else (detached,)
    for p, d in zip(parts, parts_d, strict=True):
        assert not d.requires_grad and d.grad_fn is None
        assert torch.equal(p, d)


def test_config_validation_and_round_trip():
    config = ModelConfig(vocab_size=7, hidden_size=9, num_layers=1, dropout=0.1, cell_type="gru")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="cell_type"):
        ModelConfig(vocab_size=7, cell_type="rnn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(vocab_size=7, hidden_size=0)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(vocab_size=7, dropout=1.0)
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_parameter_count_of_lstm():
    model = make_model("lstm", layers=2)
    c = model.config
    expected = (
        c.vocab_size * c.embedding_size
        + 4 * c.hidden_size * (c.embedding_size + c.hidden_size + 2)
        + 4 * c.hidden_size * (2 * c.hidden_size + 2)
        + c.hidden_size * c.vocab_size
        + c.vocab_size
    )
    assert count_parameters(model) == expected

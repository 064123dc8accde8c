"""The LSTM and GRU cells written directly from their equations.

Used by the tests to prove that the fused nn.LSTM / nn.GRU compute exactly these
equations with the same weights. Slow on purpose: one step and one gate at a time.

nn.LSTM stores the four gate blocks stacked in the order (input, forget, candidate,
output) and splits W into a part applied to x_t (weight_ih) and one applied to
h_{t-1} (weight_hh), with a bias for each; W·[h_{t-1}, x_t] + b is their sum.
"""

from __future__ import annotations

import torch
from torch import nn


def _affine(rnn: nn.RNNBase, layer: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """W·[h_{t-1}, x_t] + b for all gates of one layer, stacked along the last dim."""
    w_ih = getattr(rnn, f"weight_ih_l{layer}")
    w_hh = getattr(rnn, f"weight_hh_l{layer}")
    w = torch.cat([w_hh, w_ih], dim=1)  # [gates*hidden, hidden + input]
    b = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
    return torch.cat([h, x], dim=-1) @ w.T + b


def lstm_reference(
    rnn: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """x [batch, time, input] -> top-layer h [batch, time, hidden], (h, c) [layers, batch, hidden]."""
    h_all, c_all = [s.clone() for s in state]
    outputs = []
    for t in range(x.shape[1]):
        inp = x[:, t]
        for layer in range(rnn.num_layers):
            h_prev, c_prev = h_all[layer], c_all[layer]
            z_i, z_f, z_c, z_o = _affine(rnn, layer, inp, h_prev).chunk(4, dim=-1)
            f = torch.sigmoid(z_f)  # forget gate
            i = torch.sigmoid(z_i)  # input gate
            c_tilde = torch.tanh(z_c)  # candidate
            c = f * c_prev + i * c_tilde  # cell state: only multiplied and added
            o = torch.sigmoid(z_o)  # output gate
            h = o * torch.tanh(c)
            h_all[layer], c_all[layer] = h, c
            inp = h  # h of layer l is the input of layer l+1
        outputs.append(inp)
    return torch.stack(outputs, dim=1), (h_all, c_all)


def gru_reference(
    rnn: nn.GRU, x: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard GRU: r, z gates; n = tanh(W_in x + b_in + r ∘ (W_hn h + b_hn)); h = (1-z)∘n + z∘h."""
    h_all = state.clone()
    outputs = []
    for t in range(x.shape[1]):
        inp = x[:, t]
        for layer in range(rnn.num_layers):
            h_prev = h_all[layer]
            gi = inp @ getattr(rnn, f"weight_ih_l{layer}").T + getattr(rnn, f"bias_ih_l{layer}")
            gh = h_prev @ getattr(rnn, f"weight_hh_l{layer}").T + getattr(rnn, f"bias_hh_l{layer}")
            i_r, i_z, i_n = gi.chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            r = torch.sigmoid(i_r + h_r)  # reset gate
            z = torch.sigmoid(i_z + h_z)  # update gate
            n = torch.tanh(i_n + r * h_n)  # candidate
            h = (1 - z) * n + z * h_prev
            h_all[layer] = h
            inp = h
        outputs.append(inp)
    return torch.stack(outputs, dim=1), h_all

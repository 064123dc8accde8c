"""The character-level recurrent language model served by lstm-serve.

embedding -> stacked LSTM (or GRU) layers -> linear head over the vocabulary.
The fused torch modules (nn.LSTM / nn.GRU) do the work; `model/reference.py`
holds the same cells written out from the equations, and the tests prove the
two agree.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any, Literal, Union

import torch
from torch import nn

CellType = Literal["lstm", "gru"]

# The recurrent state: (h, c) for the LSTM, h for the GRU; each [layers, batch, hidden].
State = Union[tuple[torch.Tensor, torch.Tensor], torch.Tensor]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # number of distinct characters (token ids are 0..vocab_size-1)
    embedding_size: int = 128  # width of the token embedding fed to layer 0
    hidden_size: int = 512  # width of h (and c) in every layer
    num_layers: int = 2  # stacked recurrent layers; h of layer l feeds layer l+1
    dropout: float = 0.0  # between layers and before the head, training only
    cell_type: CellType = "lstm"  # "lstm" keeps (h, c); "gru" keeps h only

    def __post_init__(self) -> None:
        if self.cell_type not in ("lstm", "gru"):
            raise ValueError(f"cell_type must be 'lstm' or 'gru', got {self.cell_type!r}")
        # Types are checked too: a config read from JSON may hold "64", 64.0 or true.
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    @property
    def state_tensors(self) -> int:
        """How many [layers, batch, hidden] tensors make up one state."""
        return 2 if self.cell_type == "lstm" else 1


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        rnn_cls = nn.LSTM if config.cell_type == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            input_size=config.embedding_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def zero_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        weight = self.head.weight
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        kw: dict[str, Any] = {"device": device or weight.device, "dtype": dtype or weight.dtype}
        if self.config.cell_type == "lstm":
            return (torch.zeros(shape, **kw), torch.zeros(shape, **kw))
        return torch.zeros(shape, **kw)

    def forward_hidden(
        self, tokens: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """tokens [batch, time] -> top-layer h for every step [batch, time, hidden], new state."""
        x = self.embedding(tokens)
        out, new_state = self.rnn(x, state)
        return out, new_state

    def forward(
        self, tokens: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """tokens [batch, time] -> logits [batch, time, vocab] (next-token), new state.

        Works for a whole sequence and for one step (time == 1); `state=None` means zeros.
        """
        out, new_state = self.forward_hidden(tokens, state)
        return self.head(self.drop(out)), new_state


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available, else cpu; the CUDA path differs only in device and dtype."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")
    return torch.device(name)


def detach_state(state: State) -> State:
    """Cut the graph behind a carried state (truncated backpropagation through time)."""
    if isinstance(state, tuple):
        return (state[0].detach(), state[1].detach())
    return state.detach()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

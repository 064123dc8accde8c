"""The model runner: owns the model and every session's recurrent state on the device.

States live in preallocated slabs, one per state tensor ([layers, capacity, hidden];
h and c for the LSTM, h for the GRU); a session owns a slot (a column). One `execute`
call gathers the rows of the scheduled sessions, runs the model once over the packed
batch, scatters the new states back, computes log-softmax, top-k and sampling on the
device, and copies the results to the host once.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.checkpoint import Checkpoint
from service.sampling import sample_tokens

# Single steps of up to this many sessions run through the per-layer cell kernels, larger
# ones through nn.LSTM/nn.GRU (see ModelRunner._single_step).
CELL_KERNEL_MAX_BATCH = 32

# glibc's malloc serves blocks above its mmap threshold (128 KiB at start, raised to the size of
# such a block when one is freed) from fresh mappings that it unmaps on free, and gives the top of
# a heap back to the system beyond a trim threshold. A step allocates and frees ~10-30 MB of
# activations, and depending on the order of earlier frees a process ended up either keeping
# that memory or mapping and faulting it in anew on every step: measured at 256 sessions, one
# token each, ~3,300 page faults and 29-37 ms per step against 0 and 20-23 ms, in the engine's
# thread more often than not. Fixed thresholds (which also stop the adjusting) keep it.
MALLOC_MMAP_THRESHOLD_BYTES = 32 << 20  # the largest glibc accepts
MALLOC_TRIM_THRESHOLD_BYTES = 64 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from <malloc.h>


def retain_step_memory() -> bool:
    """Set this process's glibc malloc thresholds (above); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl has no libc.so.6)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)
    )


def claim_torch_threads(requested: int = 0) -> int:
    """The torch CPU threads for the engine thread (requested, 0 = torch's default); from now on
    the calling thread's own torch work (loading the checkpoint, building the engine) runs on one.

    Call it before the caller's first torch operation. libgomp, the OpenMP runtime of torch's CPU
    builds, gives every OS thread that runs a parallel region a pool of workers of its own, and
    once it manages more threads than there are CPUs it cuts the spin-wait at its barriers to ~100
    iterations (from ~300,000): the dozens of barriers of every step then put the threads to sleep
    and wake them through the kernel. The thread that loaded the checkpoint was such a second
    pool: on 2 cores a 64-session, 16-token step took 50.8 instead of 41.6 ms (docs/performance.md,
    "One OpenMP pool"). So only the engine thread runs parallel regions.
    """
    default = torch.get_num_threads()  # (also torch's once-per-thread setup, which would undo the 1 below)
    torch.set_num_threads(1)
    return requested or default


@dataclass
class SamplingParams:
    temperature: float  # 0 = greedy
    top_k: int  # 0 = no limit
    top_p: float  # 1.0 = no limit
    seed: int  # int64 bits of the request's seed


@dataclass
class RowInput:
    slot: int  # the session's state slot
    tokens: list[int]  # input tokens to feed (empty for a sampling row)
    position: int  # the session's position before this row runs
    top_k: int = 0  # top tokens to return per input token
    want_logprobs: bool = False  # return the full log-softmax per input token
    want_hidden: bool = False  # return the top layer's h per input token
    sampling: SamplingParams | None = None  # set for a sampling row


@dataclass
class RowOutput:
    top_tokens: np.ndarray | None = None  # [n, k] int64, most likely first
    top_logprobs: np.ndarray | None = None  # [n, k] float32
    logprobs: np.ndarray | None = None  # [n, vocab] float32
    hidden: np.ndarray | None = None  # [n, hidden] float32
    sampled_token: int = -1  # sampling row: the token drawn and fed
    sampled_logprob: float = 0.0  # its log-probability under the model (no temperature)


@dataclass
class SlabStats:
    capacity: int  # slots allocated on the device
    used: int  # slots owned by sessions
    bytes: int  # device memory of the state slabs
    slot_bytes: int = field(default=0)  # bytes of one session's state


class ModelRunner:
    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        initial_capacity: int = 64,
        max_capacity: int = 100_000,
    ) -> None:
        retain_step_memory()  # process-wide, and what every step here allocates needs it
        self.model = checkpoint.model.to(device=device, dtype=dtype).eval()
        self.config = checkpoint.config
        self.device = device
        self.dtype = dtype
        self.max_capacity = max_capacity
        capacity = max(1, min(initial_capacity, max_capacity))
        shape = (self.config.num_layers, capacity, self.config.hidden_size)
        self.slabs = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.config.state_tensors)]
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        rnn = self.model.rnn
        self._layer_weights = [
            tuple(getattr(rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for layer in range(self.config.num_layers)
        ]
        self._used = 0

    # ---- slots ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.slabs[0].shape[1]

    def stats(self) -> SlabStats:
        total = sum(s.numel() * s.element_size() for s in self.slabs)
        return SlabStats(self.capacity, self._used, total, total // self.capacity)

    def _grow(self) -> None:
        old = self.capacity
        if old >= self.max_capacity:
            raise RuntimeError("state slab is at max capacity")
        # Grow by an eighth (at least 64 slots): spare capacity stays a small share of memory
        # (the 100,000-idle-session target allows 25% over the raw state bytes in all).
        new = min(self.max_capacity, max(old + 64, old + old // 8))
        grown = []
        for slab in self.slabs:
            bigger = torch.zeros((slab.shape[0], new, slab.shape[2]), device=self.device, dtype=self.dtype)
            bigger[:, :old] = slab
            grown.append(bigger)
        self.slabs = grown
        self._free.extend(range(new - 1, old - 1, -1))

    def allocate(self) -> int:
        """A zeroed slot for a new session."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.zero(slot)
        self._used += 1
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)
        self._used -= 1

    @torch.inference_mode()
    def zero(self, slot: int) -> None:
        for slab in self.slabs:
            slab[:, slot].zero_()

    @torch.inference_mode()
    def read_state(self, slot: int) -> list[np.ndarray]:
        """A slot's state tensors on the host, [layers, hidden] each."""
        return self.read_states([slot])[0]

    @torch.inference_mode()
    def read_states(self, slots: list[int]) -> list[list[np.ndarray]]:
        """Several slots' state tensors on the host (one gather and one copy per slab)."""
        if not slots:
            return []
        index = torch.tensor(slots, device=self.device)
        parts = [slab.index_select(1, index).float().cpu().numpy() for slab in self.slabs]  # [layers, n, hidden]
        return [[np.ascontiguousarray(part[:, i]) for part in parts] for i in range(len(slots))]

    @torch.inference_mode()
    def write_state(self, slot: int, state: list[np.ndarray]) -> None:
        if len(state) != len(self.slabs):
            raise ValueError(f"state has {len(state)} tensors, the model keeps {len(self.slabs)}")
        expected = (self.config.num_layers, self.config.hidden_size)
        for part in state:
            if tuple(part.shape) != expected:  # (a [1, hidden] part would broadcast into every layer)
                raise ValueError(f"state tensor of shape {tuple(part.shape)}, the model keeps {expected}")
        for slab, part in zip(self.slabs, state):
            slab[:, slot] = torch.from_numpy(part).to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def copy(self, src: int, dst: int) -> None:
        for slab in self.slabs:
            slab[:, dst] = slab[:, src]

    # ---- the step ------------------------------------------------------------------------

    def _single_step(self, x: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """One time step through the fused per-layer cells (the same weights as nn.LSTM/nn.GRU).

        For one token per session the sequence kernel of nn.LSTM pays a fixed overhead that
        dominates at small batches: measured alone (2x512, float32, 2 cores) the cells are ~4x
        faster at batch 1-8 and ~1.3x at 64. In the server, though, the RPC thread competes
        with the step for the cores and the GIL, and nn.LSTM's one call then wins above a few
        dozen sessions (A/B served, 3 pairs each: 64 token-by-token sessions +3-10 % tokens/s,
        p99 46-63 -> 44-52 ms; 256 sessions p99 157-159 -> 143-154 ms; while at 8 sessions the
        cells stay 11-20 % faster and at 32 about even). Hence CELL_KERNEL_MAX_BATCH = 32.
        """
        inp = x
        hs, cs = [], []
        for layer in range(self.config.num_layers):
            weights = self._layer_weights[layer]
            if len(state) == 2:
                h, c = torch._VF.lstm_cell(inp, (state[0][layer], state[1][layer]), *weights)
                cs.append(c)
            else:
                h = torch._VF.gru_cell(inp, state[0][layer], *weights)
            hs.append(h)
            inp = h  # dropout is off at inference, as in nn.LSTM's eval mode
        new_state = (torch.stack(hs), torch.stack(cs)) if cs else torch.stack(hs)
        return inp.unsqueeze(1), new_state

    @torch.inference_mode()
    def execute(self, rows: list[RowInput]) -> list[RowOutput]:
        model, device = self.model, self.device
        n_rows = len(rows)
        slots = torch.tensor([r.slot for r in rows], device=device)
        state = [slab.index_select(1, slots) for slab in self.slabs]

        lengths = [max(len(r.tokens), 1) for r in rows]
        t_max = max(lengths)
        uniform = all(n == t_max for n in lengths)
        # One host tensor built from one flat list (padding with 0; sampling rows get their token later).
        flat_tokens: list[int] = []
        for r in rows:
            flat_tokens.extend(r.tokens or (0,))
            if not uniform:
                flat_tokens.extend([0] * (t_max - max(len(r.tokens), 1)))
        tokens = torch.tensor(flat_tokens, dtype=torch.long).view(n_rows, t_max).to(device, non_blocking=True)

        sample_idx = [i for i, r in enumerate(rows) if r.sampling is not None]
        sampled = sampled_logprob = None
        if sample_idx:
            idx = torch.tensor(sample_idx, device=device)
            top_h = state[0][-1].index_select(0, idx)  # top layer's h: the next-token distribution
            logp = torch.log_softmax(model.head(top_h).float(), dim=-1)
            params = [rows[i].sampling for i in sample_idx]
            assert all(p is not None for p in params)
            sampled = sample_tokens(
                logp,
                torch.tensor([p.temperature for p in params], device=device),  # type: ignore[union-attr]
                torch.tensor([p.top_k for p in params], device=device),  # type: ignore[union-attr]
                torch.tensor([p.top_p for p in params], device=device),  # type: ignore[union-attr]
                torch.tensor([p.seed for p in params], device=device),  # type: ignore[union-attr]
                torch.tensor([rows[i].position for i in sample_idx], device=device),
            )
            sampled_logprob = logp.gather(1, sampled.unsqueeze(-1)).squeeze(-1)
            tokens[idx, 0] = sampled

        x = model.embedding(tokens)
        rnn_state = (state[0], state[1]) if len(state) == 2 else state[0]
        if t_max == 1 and n_rows <= CELL_KERNEL_MAX_BATCH:
            out, new_state = self._single_step(x[:, 0], state)
        elif uniform:
            out, new_state = model.rnn(x, rnn_state)
        else:
            packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
            packed_out, new_state = model.rnn(packed, rnn_state)
            out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=t_max)
        new_parts = new_state if isinstance(new_state, tuple) else (new_state,)
        for slab, part in zip(self.slabs, new_parts):
            slab.index_copy_(1, slots, part)

        # Outputs for the input tokens of step rows (sampling rows report their token only).
        out_rows = [i for i, r in enumerate(rows) if r.sampling is None]
        results = [RowOutput() for _ in rows]
        device_out: dict[str, torch.Tensor] = {}
        offsets: list[int] = []
        if out_rows:
            total = 0
            for i in out_rows:
                offsets.append(total)
                total += lengths[i]
            if uniform and len(out_rows) == n_rows:
                flat = out.reshape(n_rows * t_max, -1)
            else:  # the valid positions of the output rows, row by row, token by token
                index = [i * t_max + j for i in out_rows for j in range(lengths[i])]
                flat = out.reshape(n_rows * t_max, -1).index_select(0, torch.tensor(index, device=device))
            logp_all = torch.log_softmax(model.head(flat).float(), dim=-1)
            k = max(rows[i].top_k for i in out_rows)
            if k > 0:
                top_lp, top_ix = logp_all.topk(min(k, logp_all.shape[-1]), dim=-1)
                device_out["top_lp"], device_out["top_ix"] = top_lp, top_ix
            if any(rows[i].want_logprobs for i in out_rows):
                device_out["logp"] = logp_all
            if any(rows[i].want_hidden for i in out_rows):
                device_out["hidden"] = flat.float()
        if sampled is not None and sampled_logprob is not None:
            device_out["sampled"], device_out["sampled_lp"] = sampled, sampled_logprob
        host = {name: t.cpu().numpy() for name, t in device_out.items()}  # the one copy to the host

        # Log-probabilities and hidden states are copied out of the batch's arrays (where there are
        # other rows): a view would keep the whole batch's array alive as long as one answer waits
        # for a client that does not read. (Top-k slices are small: views.)
        own = np.copy if len(out_rows) > 1 else np.asarray
        for j, i in enumerate(out_rows):
            r, start = rows[i], offsets[j]
            end = start + lengths[i]
            res = results[i]
            if r.top_k > 0:
                res.top_tokens = host["top_ix"][start:end, : r.top_k]
                res.top_logprobs = host["top_lp"][start:end, : r.top_k]
            if r.want_logprobs:
                res.logprobs = own(host["logp"][start:end])
            if r.want_hidden:
                res.hidden = own(host["hidden"][start:end])
        for j, i in enumerate(sample_idx):
            results[i].sampled_token = int(host["sampled"][j])
            results[i].sampled_logprob = float(host["sampled_lp"][j])
        return results

"""Sampling on the device, as a pure function of (seed, position, logits).

The random number for a token comes from an integer hash of the session's seed and the
position being generated, not from a generator shared by the batch, so the same request
on the same state gives the same text whether the server is idle or busy.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors; products wrap mod 2^64, and
    only their low 32 bits are kept, which wrapping preserves."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def uniform_from(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A number in [0, 1) for every (seed, position) pair, identical on every device."""
    h = _hash32(positions ^ 0x9E3779B9)
    h = _hash32(h ^ (positions >> 32))
    h = _hash32(h ^ seeds)
    h = _hash32(h ^ (seeds >> 32))
    return h.to(torch.float64).div(2.0**32).to(torch.float32)


def to_signed64(value: int) -> int:
    """A uint64 seed as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """logits [rows, vocab] -> one token per row.

    temperature [rows] (0 = greedy), top_k [rows] (0 = all), top_p [rows] in (0, 1],
    seeds and positions [rows] int64. Inverse-CDF sampling over the sorted, filtered
    distribution with a uniform drawn from (seed, position).
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    # Shift each row's largest logit to 0 first: a tiny temperature then sends the others towards -inf, never
    # to inf (logits / 1e-40 overflows float32, the softmax turns to nan and the pick is token 0).
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    scaled = shifted / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(-1)
    keep = ranks < k
    before = probs.cumsum(dim=-1) - probs  # probability mass ahead of each token
    keep &= before < top_p.unsqueeze(-1)  # the smallest prefix that reaches top_p
    keep[:, 0] = True
    probs = probs * keep
    cdf = probs.cumsum(dim=-1)
    u = uniform_from(seeds, positions) * cdf[:, -1]
    choice = (cdf <= u.unsqueeze(-1)).sum(dim=-1).clamp(max=vocab - 1)
    # A filtered-out tail has cdf == total; never land past the kept prefix.
    choice = torch.minimum(choice, keep.sum(dim=-1) - 1)
    sampled = sorted_idx.gather(1, choice.unsqueeze(-1)).squeeze(-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)

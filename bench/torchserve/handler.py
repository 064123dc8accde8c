"""A TorchServe handler that serves an lstm-serve checkpoint with per-sequence state.

What `lstm-bench torchserve` runs lstm-serve against: TorchServe's stateful sequence batching
(`sequenceBatching: true`), where the frontend batches one request from each of many sequences
and the handler keeps each sequence's state between requests, keyed by its sequence id. To
compare serving stacks rather than models, the state is held the way lstm-serve's runner holds
it (slabs of [layers, capacity, hidden] rows, gathered and scattered per batch) and a batch is
one call of the same `CharRNN` with the same answer (log-softmax, top-k, one copy to the host).

Runs inside TorchServe's Python worker, which imports nothing of this repository: the model-config
YAML's `handler` section names the repository (put on sys.path), the checkpoint, the torch
threads, the state capacity and top_k.

A request's body is a JSON list of token ids; its answer is JSON, per token, the top-k next
tokens and their log-probabilities.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch


class LstmSequenceHandler:
    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, context: Any) -> None:
        cfg = (context.model_yaml_config or {}).get("handler") or {}
        if cfg.get("repo") and cfg["repo"] not in sys.path:
            sys.path.insert(0, cfg["repo"])
        from model.checkpoint import load_checkpoint  # (from the repository named above)

        torch.set_num_threads(int(cfg.get("threads", 2)))
        self.model = load_checkpoint(cfg["checkpoint"]).model
        self.top_k = int(cfg.get("top_k", 5))
        capacity = int(cfg.get("capacity", 4096))
        state = self.model.zero_state(capacity)
        self.slabs: list[torch.Tensor] = list(state) if isinstance(state, tuple) else [state]
        self.slots: dict[str, int] = {}  # sequence id -> its state row
        self.free = list(range(capacity - 1, -1, -1))
        self.initialized = True

    def _slot(self, sequence_id: str) -> int:
        slot = self.slots.get(sequence_id)
        if slot is None:
            if not self.free:
                raise RuntimeError(f"more than {len(self.slots)} sequences: raise the handler's capacity")
            slot = self.free.pop()
            self.slots[sequence_id] = slot
            for slab in self.slabs:
                slab[:, slot].zero_()
        return slot

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        rows: list[tuple[int, list[int]]] = []
        for idx, request in enumerate(data):
            tokens = json.loads(request.get("data") or request.get("body") or b"[]")
            rows.append((self._slot(context.get_sequence_id(idx)), [int(t) for t in tokens]))
        answers: list[str] = [""] * len(rows)
        by_length: dict[int, list[int]] = {}
        for i, (_, tokens) in enumerate(rows):
            by_length.setdefault(len(tokens), []).append(i)
        with torch.inference_mode():
            for length, members in by_length.items():
                slots = torch.tensor([rows[i][0] for i in members])
                tokens = torch.tensor([rows[i][1] for i in members], dtype=torch.long).view(len(members), length)
                state = [slab.index_select(1, slots) for slab in self.slabs]
                logits, new_state = self.model(tokens, tuple(state) if len(state) == 2 else state[0])
                new_rows = new_state if isinstance(new_state, tuple) else (new_state,)
                for slab, rows_now in zip(self.slabs, new_rows):
                    slab.index_copy_(1, slots, rows_now)
                top = torch.log_softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)
                top_tokens, top_logprobs = top.indices.tolist(), top.values.tolist()
                for j, i in enumerate(members):
                    answers[i] = json.dumps({"top_tokens": top_tokens[j], "top_logprobs": top_logprobs[j]})
        return answers

"""The engine's Runner interface over genkit's own decoder (genkit/native/llama.py: the fast
fp32 path, --native-4bit, --native-8bit).

Same contract as genkit.engine.runner.Runner: prefill, step, select, crop. Left padding is
handled with a boolean attention mask; the KV cache is preallocated and grows by doubling.
"""

from __future__ import annotations

import copy

import torch

from genkit.engine.runner import StepOutput
from genkit.native.llama import DecodeLlama, StaticKV


class NativeRunner:
    def __init__(self, model: DecodeLlama, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model = model
        self.device = input_ids.device
        self.prompt = input_ids
        self.attention_mask = attention_mask
        pos = attention_mask.long().cumsum(-1) - 1
        self.positions = pos.masked_fill(attention_mask == 0, 0)
        self.cache = StaticKV(model, input_ids.shape[0], max(64, 2 * input_ids.shape[1]))
        self.filled = 0  # cache slots in use

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def _ensure(self, end: int) -> None:
        if end <= self.cache.capacity:
            return
        grow = max(end, 2 * self.cache.capacity) - self.cache.capacity
        pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], grow, t.shape[3])], dim=2)
        self.cache.k = [pad(t) for t in self.cache.k]
        self.cache.v = [pad(t) for t in self.cache.v]
        self.cache.capacity += grow

    def _run(self, tokens, positions, n, keep, hidden, logits=True):
        start = self.filled
        self._ensure(start + n)
        keep = keep if logits else None  # None: no head product (the caller uses hidden states)
        out = self.model.forward(tokens, positions, self.cache, start, self.attention_mask[:, :start + n], keep, hidden)
        self.filled = start + n
        return StepOutput(*out) if hidden else StepOutput(out)

    def prefill(self, hidden: bool = False, all_logits: bool = False, logits: bool = True) -> StepOutput:
        n = self.prompt.shape[1]
        return self._run(self.prompt, self.positions, n, 0 if all_logits else 1, hidden, logits)

    def step(self, tokens: torch.Tensor, hidden: bool = False, logits: bool = True) -> StepOutput:
        n = tokens.shape[1]
        new_pos = self.positions[:, -1:] + torch.arange(1, n + 1, device=self.device)
        self.positions = torch.cat([self.positions, new_pos], dim=-1)
        ones = self.attention_mask.new_ones((self.batch_size, n))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        return self._run(tokens, new_pos, n, n, hidden, logits)

    def select(self, index: torch.Tensor) -> None:
        expanded = self.__dict__.pop("_expanded_from", None)
        if expanded is not None and self._one_per_group(index, expanded):
            # Contrastive search keeps one of each row's k candidates: its cache is the row's
            # cache before the expansion plus the slots written since, so write just those.
            cache, filled, _ = expanded
            for old, new in ((cache.k, self.cache.k), (cache.v, self.cache.v)):
                for layer in range(len(old)):
                    old[layer][:, :, filled:self.filled] = new[layer][index, :, filled:self.filled]
            self.cache = cache
        else:
            self.cache.select(index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)

    def repeat_interleave(self, n: int) -> None:
        """Each row n times, for one step over candidates (contrastive search). The expanded
        cache holds only the filled slots plus one; the original is kept for `select`."""
        self._ensure(self.filled + 1)
        original, rows = self.cache, self.batch_size
        index = torch.arange(rows, device=self.device).repeat_interleave(n)
        self.cache = copy.copy(original)
        self.cache.select(index, capacity=self.filled + 1)
        self._expanded_from = (original, self.filled, n)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)

    def _one_per_group(self, index: torch.Tensor, expanded) -> bool:
        original, _, n = expanded
        rows = original.k[0].shape[0]
        if self.filled > original.capacity:
            return False
        groups = torch.arange(rows, device=index.device)
        return index.numel() == rows and bool((index.div(n, rounding_mode="floor") == groups).all())

    def crop(self, length: int) -> None:
        self.filled = min(self.filled, length)
        self.attention_mask = self.attention_mask[:, :length]
        self.positions = self.positions[:, :length]

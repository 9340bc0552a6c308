"""The engine's Runner interface over genkit's own decoder (genkit/native/llama.py: the fast
fp32 path, native GGUF files, --native-8bit).

Same contract as genkit.engine.runner.Runner: prefill, step, select, crop. Left padding is
handled with a boolean attention mask; the KV cache is preallocated and grows by doubling.
"""

from __future__ import annotations

import torch

from genkit.native.kv_cache import StaticKV
from genkit.step import StepOutput, cache_slots, grown_slots


# A runner's first allocation reaches at most this far past the prompt, whatever capacity the
# caller expects (fp32 keys and values of a 4B model take 0.3 MB a slot: a generous
# max_new_tokens must not claim them all before the first token).
AHEAD = 512


class NativeRunner:
    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int | None = None):
        """`model`: a DecodeLlama (genkit/native/llama.py) or one of its subclasses. `capacity`:
        how many positions the sequences will likely reach (the cache grows past it if needed)."""
        self.model = model
        self.device = input_ids.device
        self.prompt = input_ids
        self.attention_mask = attention_mask
        pos = attention_mask.long().cumsum(-1) - 1
        self.positions = pos.masked_fill(attention_mask == 0, 0)
        n = input_ids.shape[1]
        self.cache = StaticKV(model, input_ids.shape[0], cache_slots(max(n + 1, min(capacity or 0, n + AHEAD))))
        self.filled = 0  # cache slots in use
        # Contrastive search: `candidates` is n while the rows stand expanded n times for one
        # step; `mirrored` is n while each row still owns n identical cache rows after it.
        self.candidates: int | None = None
        self.mirrored: int | None = None

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def _ensure(self, end: int) -> None:
        if end > self.cache.capacity:
            self.cache.grow(grown_slots(end, self.cache.capacity))

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

    def step(self, tokens: torch.Tensor, hidden: bool = False, logits: bool = True,
             keep: int | None = None) -> StepOutput:
        self._collapse()
        n = tokens.shape[1]
        new_pos = self.positions[:, -1:] + torch.arange(1, n + 1, device=self.device)
        self.positions = torch.cat([self.positions, new_pos], dim=-1)
        ones = self.attention_mask.new_ones((self.batch_size, n))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        return self._run(tokens, new_pos, n, keep or n, hidden, logits)

    def select(self, index: torch.Tensor) -> None:
        n, self.candidates = self.candidates, None
        if n is not None and self._one_per_group(index, n):
            # Contrastive search keeps one of each row's n candidates. Every candidate row holds
            # the same context, so copying the winner's newest slot to its siblings leaves the
            # expanded cache ready for the next step's candidates: no per-step copy of the cache.
            self.cache.copy_slot(self.filled - 1, index.repeat_interleave(n))
            self.mirrored = n
        else:
            self._collapse()
            self.cache.select(index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)

    def repeat_interleave(self, n: int) -> None:
        """Each row n times, for one step over candidates (contrastive search, beam search)."""
        index = torch.arange(self.batch_size, device=self.device).repeat_interleave(n)
        if self.mirrored != n:
            self._collapse()
            self.cache.select(index)
        self.mirrored, self.candidates = None, n
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)

    def _collapse(self) -> None:
        """Back to one cache row per row after contrastive steps left each row n times."""
        n, self.mirrored = self.mirrored, None
        if n is not None:
            self.cache.select(torch.arange(self.batch_size, device=self.device) * n)

    def _one_per_group(self, index: torch.Tensor, n: int) -> bool:
        rows = self.batch_size // n
        groups = torch.arange(rows, device=index.device)
        return index.numel() == rows and bool((index.div(n, rounding_mode="floor") == groups).all())

    def crop(self, length: int) -> None:
        self.filled = min(self.filled, length)
        self.attention_mask = self.attention_mask[:, :length]
        self.positions = self.positions[:, :length]

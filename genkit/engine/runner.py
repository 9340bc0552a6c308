"""The model side of decoding: forward passes over a KV cache.

Strategies never call the model directly; they ask a Runner for the logits of the next
position(s). That keeps padding, position ids, the attention mask and the cache in one place,
and it is the seam where speed work (a static cache, compiled steps) plugs in without touching
any strategy.

Position ids and the attention mask follow what transformers' `generate()` feeds the model, so
the logits (and therefore greedy tokens) are the same.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
from transformers import DynamicCache, EncoderDecoderCache

from genkit.step import StepOutput


@cache
def _cache_argument(model_class) -> str:
    """The name a model's forward takes its KV cache by: `cache` from transformers 5.24 on,
    `past_key_values` before (5.24 warns that this name goes in 5.40)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache) -> dict:
    """The keyword argument that hands `cache` to `model`'s forward."""
    return {_cache_argument(type(model)): cache}


class Runner:
    """transformers' forward over its dynamic cache: genkit.step.Runner for decoder-only models."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model = model
        self.device = input_ids.device
        self.attention_mask = attention_mask
        # Pads take position 0; real tokens count from 0 after the padding (as generate() does).
        pos = attention_mask.long().cumsum(-1) - 1
        self.positions = pos.masked_fill(attention_mask == 0, 0)
        self.cache = DynamicCache(config=model.config)
        self.prompt = input_ids

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    def _forward(self, ids, positions, mask, hidden, keep):
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **with_cache(self.model, self.cache),
            use_cache=True,
            output_hidden_states=hidden,
            logits_to_keep=keep,
        )
        logits = out.logits.to(dtype=torch.float32)
        return StepOutput(logits, out.hidden_states if hidden else None)

    def prefill(self, hidden: bool = False, all_logits: bool = False, logits: bool = True) -> StepOutput:
        """Run the prompts; logits of the last position (of every position if `all_logits`).
        `logits=False` lets a runner skip the head when the caller only wants hidden states
        (genkit's decoder does; transformers' forward always computes them)."""
        keep = 0 if all_logits else 1
        return self._forward(self.prompt, self.positions, self.attention_mask, hidden, keep)

    def step(self, tokens: torch.Tensor, hidden: bool = False, logits: bool = True,
             keep: int | None = None) -> StepOutput:
        """Feed new tokens (batch, n) after what the cache holds; logits for each of them (for
        the last `keep` only when given: a chat turn's new message needs its last one)."""
        n = tokens.shape[1]
        last = self.positions[:, -1:]
        new_pos = last + torch.arange(1, n + 1, device=self.device)
        self.positions = torch.cat([self.positions, new_pos], dim=-1)
        ones = self.attention_mask.new_ones((self.batch_size, n))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        return self._forward(tokens, new_pos, self.attention_mask, hidden, keep or n)

    # -- cache surgery used by beam search, contrastive search and speculative decoding --

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder / repeat) batch rows by index: beam reordering, expansion."""
        self.cache.reorder_cache(index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)

    def repeat_interleave(self, n: int) -> None:
        index = torch.arange(self.batch_size, device=self.device).repeat_interleave(n)
        self.select(index)

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions (rejected draft tokens)."""
        # transformers 5's Cache.crop takes how many positions to drop, as a negative number.
        self.cache.crop(-max(0, self.length - length))
        self.attention_mask = self.attention_mask[:, :length]
        self.positions = self.positions[:, :length]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]


class EncoderDecoderRunner(Runner):
    """The same interface for encoder-decoder models: the prompt goes through the encoder once,
    and the decoder starts from `decoder_start_token_id`."""

    def __init__(self, model, input_ids, attention_mask, start_id: int):
        self.model = model
        self.device = input_ids.device
        self.encoder_mask = attention_mask
        with torch.no_grad():
            self.encoder_out = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        b = input_ids.shape[0]
        self.prompt = torch.full((b, 1), start_id, dtype=torch.long, device=self.device)
        self.attention_mask = torch.ones((b, 1), dtype=torch.long, device=self.device)
        self.positions = torch.zeros((b, 1), dtype=torch.long, device=self.device)
        self.cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))

    def _forward(self, ids, positions, mask, hidden, keep):
        out = self.model(
            encoder_outputs=self.encoder_out,
            attention_mask=self.encoder_mask,
            decoder_input_ids=ids,
            **with_cache(self.model, self.cache),
            use_cache=True,
            output_hidden_states=hidden,
        )
        logits = out.logits[:, -keep:] if keep else out.logits
        return StepOutput(logits.to(dtype=torch.float32), out.decoder_hidden_states if hidden else None)

    def select(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)
        self.encoder_mask = self.encoder_mask.index_select(0, index)
        self.encoder_out.last_hidden_state = self.encoder_out.last_hidden_state.index_select(0, index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)

"""The contract between the decode strategies and whatever runs the model.

A strategy never calls a model: it asks a runner (transformers' forward, the static cache,
genkit's decoder over fp32 weights, a .gguf's native decoder) for the logits of the next
position(s), and asks it to keep, reorder or forget cache rows. Every runner implements
`Runner`; genkit/engine/backends.py chooses which one at load. This module imports nothing
of genkit's, so every layer may depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


# Preallocated KV caches (the static runner's, the native runner's) hold slots in multiples of
# this (keeps a mask's rows aligned for SDPA) and grow by doubling.
CACHE_ROUND = 64


def cache_slots(positions: int) -> int:
    """Slots for `positions` positions: rounded up to a multiple of CACHE_ROUND."""
    return -(-positions // CACHE_ROUND) * CACHE_ROUND


def grown_slots(end: int, capacity: int) -> int:
    """The new size of a cache of `capacity` slots that must reach position `end`: doubled, or
    to `end` if that is further."""
    return cache_slots(max(end, 2 * capacity))


@dataclass
class StepOutput:
    logits: torch.Tensor  # (batch, new_positions, vocab), float32
    hidden_states: tuple | None = None  # per layer (batch, new_positions, hidden) when asked


class Runner(Protocol):
    """Incremental forward passes over a KV cache for a batch of left-padded prompts."""

    prompt: torch.Tensor  # (batch, prompt_length) the prompts' ids

    @property
    def batch_size(self) -> int: ...

    @property
    def length(self) -> int:
        """Positions the cache holds (prompt included)."""

    def prefill(self, hidden: bool = False, all_logits: bool = False, logits: bool = True) -> StepOutput:
        """Run the prompts: the last position's logits (every position's with `all_logits`);
        `logits=False` may skip the head when only hidden states are wanted."""

    def step(self, tokens: torch.Tensor, hidden: bool = False, logits: bool = True,
             keep: int | None = None) -> StepOutput:
        """Feed (batch, n) tokens after what the cache holds: logits for each of them, or for the
        last `keep` only."""

    def select(self, index: torch.Tensor) -> None:
        """Keep (reorder, repeat) batch rows by index: beams reordering, candidates collapsing."""

    def repeat_interleave(self, n: int) -> None:
        """Each row n times in place (contrastive search's candidates, beams from one prompt)."""

    def crop(self, length: int) -> None:
        """Forget every position after the first `length` (rejected draft tokens)."""

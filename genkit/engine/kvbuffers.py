"""The continuous batch's KV cache layout: right-aligned rows in buffers with room to grow.

genkit.engine.continuous keeps every layer's keys and values as one buffer per layer: row b's
real tokens fill the last columns before the buffer's free space, masked zeros on their left.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class KVLayer(DynamicLayer):
    """A cache layer whose keys and values are views into a buffer with room to grow.

    DynamicLayer appends a token with torch.cat, which copies the layer's whole cache on every
    step; at batch 64 that costs as much as the attention itself. Here a step writes one column
    in place, and the buffer is only rebuilt when rows join or leave (or, rarely, when it is
    full). Attention reads the same numbers either way (a strided view, bitwise the same result).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._k, self._v, self.length = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:  # full: move to a larger buffer (rare, see ContinuousBatcher._spare)
            room = max(64, end - self.length)
            self._k, self._v = pack([self.keys], self.length, room), pack([self.values], self.length, room)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values


def pack(parts: list[torch.Tensor], width: int, spare: int) -> torch.Tensor:
    """Rows of `parts` (each (rows, heads, w <= width, dim)) stacked and right-aligned at
    `width`, zeros on their left (masked padding must hold finite numbers: 0 x NaN is NaN),
    with `spare` free columns on the right to grow into."""
    rows = sum(p.shape[0] for p in parts)
    first = parts[0]
    buf = first.new_empty((rows, first.shape[1], width + spare, first.shape[3]))
    at = 0
    for p in parts:
        n, w = p.shape[0], p.shape[2]
        buf[at:at + n, :, :width - w].zero_()
        buf[at:at + n, :, width - w:width] = p
        at += n
    return buf


def left_pad(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """Zeros on the left of `dim` up to `width` (masked positions: their values never count)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)

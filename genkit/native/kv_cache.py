"""The key/value caches genkit's decoder (genkit/native/llama.py) writes and attends over.

Both keep the same small protocol: `update(layer, k, v, start, end)` writes a prompt's or a
draft's keys and values and returns everything so far; `fusable()`, `buffers(layer, start)` and
`advance(layer)` let the decode kernel write one new token in place.

- StaticKV: genkit's own, preallocated, every layer in one tensor (the native runner's).
- TransformersKV: a transformers Cache (the continuous batcher's) seen through the same protocol.
"""

from __future__ import annotations

import torch


class TransformersKV:
    """A transformers Cache seen through StaticKV's `update`."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, layer: int, k, v, start: int, end: int):
        return self.cache.update(k, v, layer)

    def fusable(self) -> bool:
        """Whether every layer keeps a contiguous buffer with room for one more token (the
        continuous batcher's layers do), so decode_attention can write into it."""
        return bool(self.cache.layers) and all(  # no layers yet: a prefill's empty cache
            getattr(layer, "_k", None) is not None and layer.length < layer._k.shape[2] and layer._k.is_contiguous()
            for layer in self.cache.layers
        )

    def buffers(self, layer: int, start: int):
        entry = self.cache.layers[layer]
        return entry._k, entry._v, entry.length

    def advance(self, layer: int) -> None:
        entry = self.cache.layers[layer]
        entry.length += 1
        entry.keys, entry.values = entry._k[:, :, :entry.length], entry._v[:, :, :entry.length]


class StaticKV:
    """Preallocated keys and values. All layers live in one tensor each,
    (layers, batch, kv_heads, capacity, head_dim), so reordering rows (beam search, contrastive
    candidates) is one copy for the whole cache, not one per layer; `k` and `v` hold each
    layer's (batch, kv_heads, capacity, head_dim) view, which the kernels write in place."""

    def __init__(self, model, batch: int, capacity: int):
        """Room for `capacity` slots of `batch` rows; `model` gives the shapes (n_layers, n_kv,
        head_dim: a DecodeLlama)."""
        shape = (model.n_layers, batch, model.n_kv, capacity, model.head_dim)
        self._set(torch.zeros(shape, dtype=torch.float32), torch.zeros(shape, dtype=torch.float32))

    def _set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.k, self.v = list(keys.unbind(0)), list(values.unbind(0))
        self.capacity = keys.shape[3]

    def fusable(self) -> bool:
        return True

    def buffers(self, layer: int, start: int):
        """Where decode_attention writes the new token: the layer's buffers and slot."""
        return self.k[layer], self.v[layer], start

    def advance(self, layer: int) -> None:
        pass  # the runner counts filled slots

    def update(self, layer: int, k, v, start: int, end: int):
        """Write the new keys and values at slots start..end; all keys and values so far."""
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def grow(self, capacity: int) -> None:
        """Room for `capacity` slots; what is filled stays."""
        more = capacity - self.capacity
        if more > 0:
            pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:3], more, t.shape[4])], dim=3)
            self._set(pad(self.keys), pad(self.values))

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (repeats allowed)."""
        self._set(self.keys.index_select(1, index), self.values.index_select(1, index))

    def copy_slot(self, slot: int, source: torch.Tensor) -> None:
        """Row r's entries at `slot` become those of row source[r], in every layer."""
        for t in (self.keys, self.values):
            t[:, :, :, slot] = t[:, source, :, slot]

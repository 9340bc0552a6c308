"""transformers' forward over a preallocated KV cache; on a GPU, each decode step is one CUDA graph.

Plain generate() on a GPU spends a small model's step launching kernels from Python: hundreds
of launches per token, each cheap for the GPU but not for the CPU that issues them. With the
cache preallocated and the step's inputs in fixed buffers, every tensor of a one-token step
keeps its address from one step to the next, so the step is captured once as a CUDA graph and
then replayed: one launch per token instead of hundreds.

The same runner works on any device (the tests run it on the CPU, graphs off): the code a graph
captures is `_decode`, which also runs as it is when graphs are off. Prefill, multi-token steps
(drafts) and steps that return hidden states (DoLa, contrastive search) run eagerly over the
same cache.

The cache is handed to the model as its `past_key_values`: transformers' attention layers call
`update(keys, values, layer)` and attend over what it returns. The attention mask is passed
ready-made in 4-D, so transformers builds none (its builder would read the cache's length on
the host, which a graph cannot do). Only models whose every layer attends to the whole context
qualify (no sliding windows: the ready-made mask would drop them).
"""

from __future__ import annotations

import os

import torch

from genkit.engine.runner import StepOutput

# Decoder-only architectures whose attention layers store keys and values through
# `past_key_values.update(k, v, layer)` and attend to the whole context.
FULL_ATTENTION_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "phi3")
ROUND = 64  # capacity grows in multiples of this (keeps the mask's rows aligned for SDPA)


def eligible(model) -> bool:
    """Can this model run on the static cache? Decoder-only, a known full-attention
    architecture, sdpa or eager attention (they take a 4-D mask), all weights on one device."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False) or cfg.model_type not in FULL_ATTENTION_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    devices = {p.device for p in model.parameters()}
    return len(devices) == 1


def wanted(model) -> bool:
    """On by default on CUDA, where it pays; GENKIT_STATIC=1 forces it elsewhere (tests),
    GENKIT_STATIC=0 turns it off (to compare with the dynamic cache)."""
    flag = os.environ.get("GENKIT_STATIC")
    if flag == "0":
        return False
    on_cuda = next(model.parameters()).device.type == "cuda"
    return (flag == "1" or on_cuda) and eligible(model)


def _rounded(n: int) -> int:
    return -(-n // ROUND) * ROUND


class SlotCache:
    """Keys and values of every layer in two preallocated tensors (layers, batch, heads,
    capacity, head_dim). `update` writes the new positions at `slots` and returns the first
    `visible` slots of the layer; the attention mask hides the slots not filled yet."""

    def __init__(self, layers: int):
        self.layers = layers
        self.keys: torch.Tensor | None = None  # allocated at the first update (prefill)
        self.values: torch.Tensor | None = None
        self.capacity = 0
        self.slots: torch.Tensor | None = None
        self.visible = 0

    def allocate(self, key_states, value_states, capacity: int) -> None:
        b, h, _, dk = key_states.shape
        kw = dict(dtype=key_states.dtype, device=key_states.device)
        self.keys = torch.zeros(self.layers, b, h, capacity, dk, **kw)
        self.values = torch.zeros(self.layers, b, h, capacity, value_states.shape[-1], **kw)
        self.capacity = capacity

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys is None:
            self.allocate(key_states, value_states, self.capacity)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.slots, key_states.to(k.dtype))
        v.index_copy_(2, self.slots, value_states.to(v.dtype))
        return k[:, :, : self.visible], v[:, :, : self.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.visible

    def resize(self, capacity: int) -> None:
        """More slots, same contents (new tensors: graphs captured on the old ones are stale)."""
        if self.keys is not None:
            grown = []
            for t in (self.keys, self.values):
                new = t.new_zeros(*t.shape[:3], capacity, t.shape[-1])
                new[:, :, :, : self.capacity] = t
                grown.append(new)
            self.keys, self.values = grown
        self.capacity = capacity

    def select(self, index: torch.Tensor) -> None:
        """Reorder / repeat batch rows. Same batch size: in place, so captured graphs stay valid."""
        if self.keys is None:
            return
        if index.numel() == self.keys.shape[1]:
            self.keys.copy_(self.keys.index_select(1, index))
            self.values.copy_(self.values.index_select(1, index))
        else:
            self.keys = self.keys.index_select(1, index)
            self.values = self.values.index_select(1, index)


class StaticRunner:
    """The Runner contract (prefill, step, select, repeat_interleave, crop) over a SlotCache."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int | None = None):
        self.model = model
        self.device = input_ids.device
        self.prompt = input_ids
        b, p = input_ids.shape
        pos = attention_mask.long().cumsum(-1) - 1
        self.prompt_positions = pos.masked_fill(attention_mask == 0, 0)
        # Position of slot j >= p is base + (j - p): every row is real from the prompt on.
        self.base = self.prompt_positions[:, -1:] + 1
        self.cache = SlotCache(model.config.get_text_config().num_hidden_layers)
        self.cache.capacity = _rounded(max(capacity or 0, p + 1))
        self.keep = torch.zeros(b, self.cache.capacity, dtype=torch.bool, device=self.device)
        self.keep[:, :p] = attention_mask.bool()
        self.filled = 0  # slots holding keys and values
        self.float_mask = getattr(model.config, "_attn_implementation", "sdpa") != "sdpa"
        self.use_graphs = self.device.type == "cuda" and os.environ.get("GENKIT_CUDA_GRAPHS") != "0"
        self.graphs: dict[int, tuple] = {}  # batch size -> (graph, ids, positions, slot, logits)

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    @property
    def length(self) -> int:
        return self.filled or self.prompt.shape[1]

    # -- masks and capacity

    def _mask(self, m: torch.Tensor) -> torch.Tensor:
        """A boolean 4-D mask in the form the model's attention takes (sdpa: bool, eager: additive)."""
        if not self.float_mask:
            return m
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)

    def _ensure(self, end: int) -> None:
        if end <= self.cache.capacity:
            return
        capacity = _rounded(max(end, 2 * self.cache.capacity))
        self.cache.resize(capacity)
        keep = self.keep.new_zeros(self.batch_size, capacity)
        keep[:, : self.keep.shape[1]] = self.keep
        self.keep = keep
        self.graphs.clear()

    # -- forward passes

    def _eager(self, tokens, positions, n: int, keep_logits: int, hidden: bool) -> StepOutput:
        """n new positions at slots filled .. filled+n-1, attending to every live slot."""
        start, end = self.filled, self.filled + n
        self._ensure(end)
        if start:  # (the prompt's slots already hold its padding mask)
            self.keep[:, start:end] = True
        q = torch.arange(start, end, device=self.device)
        k = torch.arange(end, device=self.device)
        mask = self.keep[:, None, None, :end] & (k[None, :] <= q[:, None])
        # A padding position attends to itself, so no row of the mask is empty (an empty row
        # gives NaN, which would reach the real rows through the padding's cached values).
        mask = mask | (k[None, :] == q[:, None])
        self.cache.slots, self.cache.visible = q, end
        out = self.model(input_ids=tokens, attention_mask=self._mask(mask), position_ids=positions,
                         past_key_values=self.cache, use_cache=True, output_hidden_states=hidden,
                         logits_to_keep=keep_logits)
        self.filled = end
        return StepOutput(out.logits.float(), out.hidden_states if hidden else None)

    def _decode(self, ids, positions, slot) -> torch.Tensor:
        """The one-token step over the whole capacity, from fixed buffers: what a graph captures."""
        self.cache.slots, self.cache.visible = slot, self.cache.capacity
        mask = self._mask(self.keep[:, None, None, :])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits.float()

    def _buffers(self):
        b = self.batch_size
        return (torch.zeros(b, 1, dtype=torch.long, device=self.device),
                torch.zeros(b, 1, dtype=torch.long, device=self.device),
                torch.zeros(1, dtype=torch.long, device=self.device))

    def _capture(self, tokens, positions_now):
        ids, positions, slot = self._buffers()
        ids.copy_(tokens)
        positions.copy_(positions_now)
        slot.fill_(self.filled)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: writes the same slot the replay writes again
            self._decode(ids, positions, slot)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._decode(ids, positions, slot)
        return graph, ids, positions, slot, logits

    def _graph_step(self, tokens: torch.Tensor) -> StepOutput:
        self._ensure(self.filled + 1)
        self.keep[:, self.filled] = True
        positions_now = self.base + (self.filled - self.prompt.shape[1])
        entry = self.graphs.get(self.batch_size)
        if entry is None and self.use_graphs:
            try:
                entry = self.graphs[self.batch_size] = self._capture(tokens, positions_now)
            except Exception:
                # Some layers cannot be captured (a quantisation kernel that syncs with the
                # host, say): run the same step without graphs from now on.
                self.use_graphs = False
                torch.cuda.synchronize(self.device)
        if entry is None:
            slot = torch.tensor([self.filled], device=self.device)
            logits = self._decode(tokens, positions_now, slot)
        else:
            graph, ids, positions, slot, out = entry
            ids.copy_(tokens)
            positions.copy_(positions_now)
            slot.fill_(self.filled)
            graph.replay()
            logits = out.clone()  # the next replay overwrites `out`
        self.filled += 1
        return StepOutput(logits)

    # -- the Runner contract

    def prefill(self, hidden: bool = False, all_logits: bool = False, logits: bool = True) -> StepOutput:
        return self._eager(self.prompt, self.prompt_positions, self.prompt.shape[1], 0 if all_logits else 1, hidden)

    def step(self, tokens: torch.Tensor, hidden: bool = False, logits: bool = True) -> StepOutput:
        n = tokens.shape[1]
        if n == 1 and not hidden:
            return self._graph_step(tokens)
        positions = self.base + (self.filled - self.prompt.shape[1]) + torch.arange(n, device=self.device)
        return self._eager(tokens, positions, n, n, hidden)

    def select(self, index: torch.Tensor) -> None:
        """Keep (reorder, repeat) batch rows: beam reordering, candidate expansion."""
        self.cache.select(index)
        if index.numel() == self.batch_size:
            self.keep.copy_(self.keep.index_select(0, index))  # in place: graphs read this tensor
        else:
            self.keep = self.keep.index_select(0, index)
            self.graphs.clear()  # the cache has new tensors too
        self.base = self.base.index_select(0, index)
        self.prompt_positions = self.prompt_positions.index_select(0, index)

    def repeat_interleave(self, n: int) -> None:
        self.select(torch.arange(self.batch_size, device=self.device).repeat_interleave(n))

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions (rejected draft tokens)."""
        self.filled = min(self.filled, length)
        self.keep[:, length:] = False

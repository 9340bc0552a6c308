"""transformers' forward over a preallocated KV cache; on a GPU, each decode step is one CUDA graph.

Plain generate() on a GPU spends a small model's step launching kernels from Python: hundreds
of launches per token, each cheap for the GPU but not for the CPU that issues them. With the
cache preallocated and the step's inputs in fixed buffers, every tensor of a one-token step
keeps its address from one step to the next, so the step is captured once as a CUDA graph and
then replayed: one launch per token instead of hundreds.

Every step is captured, one graph per (batch size, new tokens, hidden states or not): drafts
(prompt lookup, assisted decoding) are padded to a power of two so a few widths serve them all,
and DoLa's and contrastive search's steps return hidden states from their graphs. Only the
prompt runs eagerly. The same runner works on any device (the tests run it on the CPU, graphs
off): the code a graph captures is `_step_forward`, which runs as it is when graphs are off.

The cache is handed to the model as its cache argument (runner.with_cache): transformers'
attention layers call `update(keys, values, layer)` and attend over what it returns. The attention mask is passed
ready-made in 4-D, so transformers builds none (its builder would read the cache's length on
the host, which a graph cannot do). Only models whose every layer attends to the whole context
qualify (no sliding windows: the ready-made mask would drop them).
"""

from __future__ import annotations

import torch

from genkit.engine.runner import with_cache
from genkit.step import StepOutput, cache_slots, grown_slots

# Decoder-only architectures whose attention layers store keys and values through
# `cache.update(k, v, layer)` and attend to the whole context.
FULL_ATTENTION_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "phi3")


def eligible(model) -> bool:
    """Can this model run on the static cache? Decoder-only, a known full-attention
    architecture, sdpa or eager attention (they take a 4-D mask), not quantised by
    bitsandbytes, all weights on one device."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False) or cfg.model_type not in FULL_ATTENTION_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(model, "hf_quantizer", None) is not None:
        return False  # bitsandbytes layers under graphs: not yet measured on a GPU
    devices = {p.device for p in model.parameters()}
    return len(devices) == 1


class SlotCache:
    """Keys and values of every layer in two preallocated tensors (layers, batch, heads,
    capacity, head_dim), and `live` (batch, capacity): which slots a row may attend to.

    transformers' layers call `update`, which writes the new positions at `slots` and returns
    the layer's first `visible` slots. The tensors are changed in place wherever possible,
    because a captured graph reads them by address: a reorder within the batch copies in place,
    and a change of batch size (contrastive search expands each row to its candidates and back,
    every step) copies into a spare set kept for that size."""

    def __init__(self, layers: int, live: torch.Tensor):
        self.layers = layers
        self.live = live
        self.capacity = live.shape[1]
        self.keys: torch.Tensor | None = None  # allocated at the first update (prefill)
        self.values: torch.Tensor | None = None
        self.spare: dict[int, tuple] = {}  # batch size -> (keys, values, live) not in use now
        self.slots: torch.Tensor | None = None
        self.visible = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys is None:
            b, h, _, d = key_states.shape
            kw = dict(dtype=key_states.dtype, device=key_states.device)
            self.keys = torch.zeros(self.layers, b, h, self.capacity, d, **kw)
            self.values = torch.zeros(self.layers, b, h, self.capacity, value_states.shape[-1], **kw)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.slots, key_states.to(k.dtype))
        v.index_copy_(2, self.slots, value_states.to(v.dtype))
        return k[:, :, : self.visible], v[:, :, : self.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.visible

    def resize(self, capacity: int) -> None:
        """More slots, same contents (new tensors: graphs captured on the old ones are stale)."""
        def grown(t, dim):
            new = t.new_zeros(*t.shape[:dim], capacity, *t.shape[dim + 1:])
            new.narrow(dim, 0, self.capacity).copy_(t)
            return new

        if self.keys is not None:
            self.keys, self.values = grown(self.keys, 3), grown(self.values, 3)
        self.live = grown(self.live, 1)
        self.capacity = capacity
        self.spare.clear()

    def select(self, index: torch.Tensor) -> None:
        """Keep (reorder, repeat) batch rows by index."""
        b, n = self.live.shape[0], index.numel()
        if n == b:
            self.live.copy_(self.live.index_select(0, index))
            if self.keys is not None:
                self.keys.copy_(self.keys.index_select(1, index))
                self.values.copy_(self.values.index_select(1, index))
            return
        old = (self.keys, self.values, self.live)
        keys, values, live = self.spare.pop(n, (None, None, None))
        self.live = torch.index_select(self.live, 0, index, out=live) if live is not None else self.live.index_select(0, index)
        if self.keys is not None:
            if keys is None:
                keys = self.keys.new_empty(self.layers, n, *self.keys.shape[2:])
                values = self.values.new_empty(self.layers, n, *self.values.shape[2:])
            self.keys = torch.index_select(self.keys, 1, index, out=keys)
            self.values = torch.index_select(self.values, 1, index, out=values)
        self.spare[b] = old


class StaticRunner:
    """The Runner contract (prefill, step, select, repeat_interleave, crop) over a SlotCache."""

    def __init__(self, backend, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int | None = None):
        self.backend = backend  # genkit.engine.backends.Backend: the model, and where graphs are kept
        self.model = backend.model
        self.device = input_ids.device
        self.prompt = input_ids
        b, p = input_ids.shape
        pos = attention_mask.long().cumsum(-1) - 1
        self.prompt_positions = pos.masked_fill(attention_mask == 0, 0)
        # Position of slot j >= p is base + (j - p): every row is real from the prompt on.
        self.base = self.prompt_positions[:, -1:] + 1
        self.filled = 0  # slots holding keys and values
        self.float_mask = getattr(self.model.config, "_attn_implementation", "sdpa") != "sdpa"
        self.use_graphs = self.device.type == "cuda" and backend.graphs
        # (batch, new tokens, hidden states?) -> (graph, its input buffers, its outputs)
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None  # one memory pool for all of this runner's graphs
        want = cache_slots(max(capacity or 0, p + 1))
        if not self._reuse(b, want):
            live = torch.zeros(b, want, dtype=torch.bool, device=self.device)
            self.cache = SlotCache(self.model.config.get_text_config().num_hidden_layers, live)
        self.cache.live[:, :p] = attention_mask.bool()

    def _reuse(self, batch: int, capacity: int) -> bool:
        """Take over the cache and graphs the model's previous generation left (`close`) when
        they fit this one: capturing a graph costs about two eager steps, which a loop of short
        generations (the Python API, genkit batch, genkit bench) would otherwise pay each time."""
        if not self.use_graphs or self.backend.kept is None:
            return False
        (cache, graphs, pool), self.backend.kept = self.backend.kept, None
        if cache.live.shape[0] != batch or not capacity <= cache.capacity <= 2 * capacity:
            return False
        cache.live.zero_()
        self.cache, self.graphs, self.pool = cache, graphs, pool
        return True

    def close(self) -> None:
        """The generation is over: leave the cache and graphs to the model's next one."""
        if self.graphs:
            self.backend.kept = (self.cache, self.graphs, self.pool)

    @property
    def batch_size(self) -> int:
        return self.cache.live.shape[0]

    @property
    def length(self) -> int:
        return self.filled or self.prompt.shape[1]

    def _mask(self, m: torch.Tensor) -> torch.Tensor:
        """A boolean 4-D mask in the form the model's attention takes (sdpa: bool, eager: additive)."""
        if not self.float_mask:
            return m
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)

    def _ensure(self, end: int) -> None:
        if end > self.cache.capacity:
            self.cache.resize(grown_slots(end, self.cache.capacity))
            self.graphs.clear()

    # -- forward passes

    def _forward(self, ids, positions, slots, end: int, keep_logits: int, hidden: bool):
        """New positions at `slots`, attending to every live slot before `end` up to their own."""
        k = torch.arange(end, device=self.device)
        mask = self.cache.live[:, None, None, :end] & (k[None, :] <= slots[:, None])
        # A padding position attends to itself, so no row of the mask is empty (an empty row
        # gives NaN, which would reach the real rows through the padding's cached values).
        mask = mask | (k[None, :] == slots[:, None])
        self.cache.slots, self.cache.visible = slots, end
        out = self.model(input_ids=ids, attention_mask=self._mask(mask), position_ids=positions,
                         **with_cache(self.model, self.cache), use_cache=True, output_hidden_states=hidden,
                         logits_to_keep=keep_logits)
        return out.logits.float(), tuple(out.hidden_states) if hidden else None

    def _step_forward(self, ids, positions, first_slot, hidden: bool):
        """A step over the whole capacity from fixed-size inputs: what a graph captures (and
        what runs as it is when graphs are off)."""
        n = ids.shape[1]
        slots = first_slot + torch.arange(n, device=self.device)
        return self._forward(ids, positions, slots, self.cache.capacity, n, hidden)

    def _capture(self, tokens, positions, hidden: bool):
        ids, pos, first = tokens.clone(), positions.clone(), torch.tensor([self.filled], device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: writes the same slots the replay writes again
            self._step_forward(ids, pos, first, hidden)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._step_forward(ids, pos, first, hidden)
        self.pool = graph.pool()
        return graph, (ids, pos, first), outputs

    def _graph(self, tokens, positions, hidden: bool):
        key = (*tokens.shape, hidden)
        entry = self.graphs.get(key)
        if entry is None and self.use_graphs:
            try:
                entry = self.graphs[key] = self._capture(tokens, positions, hidden)
            except Exception:
                # Some layers cannot be captured (a quantisation kernel that syncs with the
                # host, say): run the same steps without graphs from now on.
                self.use_graphs = False
                torch.cuda.synchronize(self.device)
        return entry

    # -- the Runner contract

    def prefill(self, hidden: bool = False, all_logits: bool = False, logits: bool = True) -> StepOutput:
        p = self.prompt.shape[1]
        slots = torch.arange(p, device=self.device)
        out = self._forward(self.prompt, self.prompt_positions, slots, p, 0 if all_logits else 1, hidden)
        self.filled = p
        return StepOutput(*out)

    def step(self, tokens: torch.Tensor, hidden: bool = False, logits: bool = True,
             keep: int | None = None) -> StepOutput:
        """Feed new tokens (batch, n) after what the cache holds; logits for each of them (for
        the last `keep` only when given)."""
        n = tokens.shape[1]
        # Drafts vary in length: pad them to a power of two so a few graphs serve them all.
        # The padding comes after the real tokens, which causality keeps from seeing it; its
        # slots stay dead and the next step overwrites them.
        width = 1 << (n - 1).bit_length()
        self._ensure(self.filled + width)
        if width > n:
            tokens = torch.cat([tokens, tokens[:, -1:].expand(-1, width - n)], dim=1)
        self.cache.live[:, self.filled:self.filled + n] = True
        positions = self.base + (self.filled - self.prompt.shape[1]) + torch.arange(width, device=self.device)
        entry = self._graph(tokens, positions, hidden)
        if entry is None:
            first = torch.tensor([self.filled], device=self.device)
            logits_, states = self._step_forward(tokens, positions, first, hidden)
        else:
            graph, (ids, pos, first), (logits_, states) = entry
            ids.copy_(tokens)
            pos.copy_(positions)
            first.fill_(self.filled)
            graph.replay()
        self.filled += n
        # Copies: the next replay overwrites a graph's outputs.
        logits_ = logits_[:, n - (keep or n):n].clone()
        states = tuple(h[:, :n].clone() for h in states) if hidden else None
        return StepOutput(logits_, states)

    def select(self, index: torch.Tensor) -> None:
        """Keep (reorder, repeat) batch rows: beam reordering, candidate expansion."""
        self.cache.select(index)
        self.base = self.base.index_select(0, index)
        self.prompt_positions = self.prompt_positions.index_select(0, index)

    def repeat_interleave(self, n: int) -> None:
        self.select(torch.arange(self.batch_size, device=self.device).repeat_interleave(n))

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions (rejected draft tokens)."""
        self.filled = min(self.filled, length)
        self.cache.live[:, length:] = False

"""A small Llama decoder for genkit's decode loop on the CPU (in the spirit of gpt-fast).

Fused q/k/v and gate/up products, a preallocated KV cache (`StaticKV`), rotary embeddings from a
precomputed table, and every product through a layer object that may do the RMS norm in the same
call. Three sets of layers plug in:

- genkit/native/decoder.py: a GGUF file's blocks as they are (GGUFDecoder, the default for .gguf
  files on the CPU), with the knobs of the architectures it runs.
- genkit/native/int8.py: an fp32 Llama's weights quantised to Q8_0 blocks (`--native-8bit`).
- `fast_llama()` below: a transformers Llama in fp32, sharing its weights, with genkit's kernels
  for the one-row products of decoding (about twice torch's speed there) and torch's
  products for prompts. The engine uses it for every decoder-only strategy.

Hidden states come out when a strategy asks (DoLa, contrastive search), as transformers gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genkit.native import kernels
from genkit.native.kv_cache import StaticKV, TransformersKV


class _Config:
    """The few config fields the engine reads, plus what the forward pass needs."""

    def __init__(self, cfg: dict):
        self.__dict__.update(cfg)
        self.is_encoder_decoder = False

    def get_text_config(self):
        return self


class DecodeLlama:
    """The forward pass over pluggable layers; used through genkit.native.runner.NativeRunner.

    `layers` holds per layer: attn_norm, ffn_norm (fp32 vectors) and qkv, o, gate_up, down
    (callables `f(x, norm=None, eps=0.0)`, fp32 in and out, q/k rows in rotate-half order, or in
    interleaved pairs where `interleaved_rope` is set, with cos / sin tables in the same order)."""

    interleaved_rope = False

    mode = "transformers-weights"

    def read_shape(self, cfg: dict) -> None:
        """Layer and head counts from a config (builders of the layers need them first)."""
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg["num_key_value_heads"]
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.n_heads
        self.eps = cfg["rms_norm_eps"]

    def setup(self, cfg: dict, embed, head, norm, layers) -> None:
        self.read_shape(cfg)
        self.embed, self.head, self.norm, self.layers = embed, head, norm, layers
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta") or 10000.0
        inv = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        pos = torch.arange(cfg["max_position_embeddings"], dtype=torch.float32)
        freqs = torch.outer(pos, inv)
        self.cos = torch.cat([freqs, freqs], -1).cos()
        self.sin_signed = torch.cat([-freqs, freqs], -1).sin()

    def eval(self):
        return self

    def native_runner(self, input_ids, attention_mask, capacity: int | None = None):
        """The engine asks the model for its runner (see genkit.engine.backends)."""
        from genkit.native.runner import NativeRunner

        return NativeRunner(self, input_ids, attention_mask, capacity)

    def get_output_embeddings(self):
        """The head without the final norm, as DoLa applies it to earlier layers' states."""
        return self.head

    def forward_transformers(self, input_ids, attention_mask, position_ids, cache, logits_to_keep: int = 1):
        """The forward pass with transformers' calling convention, for callers that manage a
        transformers Cache themselves (continuous batching): logits of the last positions."""
        start = attention_mask.shape[1] - input_ids.shape[1]
        return self.forward(input_ids, position_ids, TransformersKV(cache), start, attention_mask, logits_to_keep)

    def forward(self, tokens, positions, cache: "StaticKV", start: int, attention_mask, logits_for: int,
                hidden: bool = False):
        """Logits (float32) of the last `logits_for` positions (0: all, None: none) after feeding `tokens`
        (batch, n) at cache slots start..start+n; `attention_mask` (batch, start+n) holds 1 for real
        tokens and 0 for each row's left padding. With `hidden`, also the hidden states as
        transformers gives them: the embeddings, each layer's output, and the last one after the
        final norm."""
        b, n = tokens.shape
        self.cover_positions(positions)
        # Everything outside the products stays in fp32: on these CPUs small fp32 ops run 2-3x
        # faster than bf16 ones.
        x = self.embed[tokens].float()
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        end = start + n
        # One new token per row over genkit's cache: rotary embedding, cache write and attention
        # in one kernel call (`first`: each row's first real slot, after its left padding).
        fused = n == 1 and cache.fusable() and kernels.available()
        if fused:
            first = (attention_mask == 0).sum(-1)
            cos_rows, sin_rows = self.cos[positions[:, 0]], self.sin_signed[positions[:, 0]]
        else:
            mask = attention_mask_4d(attention_mask, n)
            # Rotary embedding as x * cos + partner(x) * sin', with the sign of the rotation's
            # first element of each pair folded into sin': four ops for q and k together.
            cos = self.cos[positions].unsqueeze(2)  # (b, n, 1, d)
            sin = self.sin_signed[positions].unsqueeze(2)
        if fused and (stack := self.decode_stack()) is not None:
            return self._stack_step(stack, x.view(b, -1), cos_rows, sin_rows, cache, start, first, logits_for, hidden)
        states = []
        for i, L in enumerate(self.layers):
            if hidden:
                states.append(x)
            qkv = L["qkv"](x, L["attn_norm"], self.eps)  # the norm happens inside
            if fused:
                keys, values, slot = cache.buffers(i, start)
                attn = kernels.decode_attention(qkv.view(b, -1), cos_rows, sin_rows, keys, values,
                                                slot, first, hq, hk, self.interleaved_rope).view(b, 1, hq * d)
                cache.advance(i)
            else:
                qk = qkv[..., : (hq + hk) * d].view(b, n, hq + hk, d)
                qk = qk * cos + rotary_partner(qk, self.interleaved_rope) * sin
                q = qk[:, :, :hq].transpose(1, 2)
                k = qk[:, :, hq:].transpose(1, 2)
                v = qkv[..., (hq + hk) * d:].view(b, n, hk, d).transpose(1, 2)
                keys, values = cache.update(i, k, v, start, end)
                attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
                attn = attn.transpose(1, 2).reshape(b, n, hq * d)
            x = x + L["o"](attn)
            x = x + L["down"](L["gate_up"](x, L["ffn_norm"], self.eps), glu=True)
        if hidden:
            states.append(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps))
        if logits_for is None:
            logits = None  # asked for hidden states only
        else:
            logits = self._logits(x[:, -logits_for:] if logits_for else x)
        return (logits, tuple(states)) if hidden else logits

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head over the final norm of x."""
        return self.head(x, self.norm, self.eps)

    def cover_positions(self, positions: torch.Tensor) -> None:
        """Make self.cos / self.sin_signed reach `positions`: setup's tables already cover the
        config's every position; GGUFDecoder's grow on demand."""

    # Decode steps go through the C++ DecodeStack where every layer allows it; False runs them
    # layer by layer (the stack's reference in the tests).
    stacked = True
    _stack = None
    _stack_built = False

    def decode_stack(self):
        """genkit's C++ DecodeStack over these layers, built on first use: a decode step's layers
        in one call instead of five per layer. None where a layer is not one the kernels multiply,
        the kernels are not built, or `stacked` is off."""
        if not self.stacked:
            return None
        if not self._stack_built:
            self._stack_built = True
            self._stack = self._build_stack()
        return self._stack

    def _build_stack(self):
        weights = [[L[name].kernel_weight() if hasattr(L[name], "kernel_weight") else None
                    for name in ("qkv", "o", "gate_up", "down")] for L in self.layers]
        if not kernels.available() or any(w is None for ws in weights for w in ws):
            return None
        stack = kernels.decode_stack(self.n_heads, self.n_kv, self.head_dim, self.eps)
        for L, ws in zip(self.layers, weights):
            stack.add_layer(L["attn_norm"].float().contiguous(), L["ffn_norm"].float().contiguous(),
                            *[part for w in ws for part in w])
        self._configure_stack(stack)
        return stack

    def _configure_stack(self, stack) -> None:
        """The architecture's knobs on a new stack (GGUFDecoder's); plain Llama has none."""

    def __getstate__(self):
        """Copies (copy.deepcopy of a model, e.g. to make a draft) rebuild the C++ stack over their
        own weights on first use: it cannot be pickled, and would point at the original's."""
        state = dict(self.__dict__)
        state.pop("_stack", None)
        state.pop("_stack_built", None)
        return state

    def _stack_step(self, stack, x, cos_rows, sin_rows, cache, start: int, first, logits_for, hidden: bool):
        """Every layer for one new token per row (x: (b, hidden) embeddings) through the
        DecodeStack; forward's contract for what comes back."""
        b = x.shape[0]
        states = torch.empty(self.n_layers, b, 1, x.shape[-1]) if hidden else None  # each layer's input
        slots = [cache.buffers(i, start) for i in range(self.n_layers)]
        x = x.contiguous()
        stack.forward(x, cos_rows, sin_rows, [k for k, _, _ in slots], [v for _, v, _ in slots], slots[0][2], first,
                      states)
        for i in range(self.n_layers):
            cache.advance(i)
        x = x.view(b, 1, -1)
        logits = self._logits(x) if logits_for is not None else None
        if not hidden:
            return logits
        return logits, (*states.unbind(0), F.rms_norm(x, (x.shape[-1],), self.norm, self.eps))


@dataclass
class DenseLinear:
    """An fp32 (out, in) weight, multiplied by genkit's kernels (which hand prompts' many rows
    to torch's product, faster there)."""

    weight: torch.Tensor

    def __call__(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                 glu: bool = False) -> torch.Tensor:
        shape = x.shape
        y = kernels.dense_matmul(x.reshape(-1, shape[-1]).contiguous(), self.weight, norm, eps, glu)
        return y.reshape(*shape[:-1], y.shape[-1])

    def kernel_weight(self):
        """([weight], [kind]) as kernels.decode_stack's layers take them."""
        return [self.weight], [kernels.dense_kind(self.weight)]


def rotary_partner(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Each element's partner in the rotary embedding (x cos + partner(x) sin): x_(i +- d/2), or
    x_(i xor 1) where q/k rows keep llama.cpp's interleaved pairs."""
    if interleaved:
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x.roll(x.shape[-1] // 2, dims=-1)


def glu_input(x: torch.Tensor) -> torch.Tensor:
    """The MLP's down-projection input from its fused gate/up output: silu(gate) * up."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


class FastLlama(DecodeLlama):
    """A transformers LlamaForCausalLM's weights (shared, not copied) under DecodeLlama."""

    def __init__(self, hf):
        cfg = hf.config.to_dict()
        self.config, self.device, self.dtype = hf.config, torch.device("cpu"), torch.float32
        layers = []
        for block in hf.model.layers:
            a, m = block.self_attn, block.mlp
            layers.append({
                "attn_norm": block.input_layernorm.weight.detach(),
                "ffn_norm": block.post_attention_layernorm.weight.detach(),
                "qkv": DenseLinear(_fuse(a.q_proj, a.k_proj, a.v_proj)),
                "o": DenseLinear(a.o_proj.weight.detach()),
                "gate_up": DenseLinear(_fuse(m.gate_proj, m.up_proj)),
                "down": DenseLinear(m.down_proj.weight.detach()),
            })
        embed = hf.model.embed_tokens.weight.detach()
        self.setup(cfg, embed, DenseLinear(hf.lm_head.weight.detach()), hf.model.norm.weight.detach(), layers)


def _fuse(*linears) -> torch.Tensor:
    """One weight for several Linears stacked by rows; each Linear's weight becomes a view into
    it, so transformers' forward and ours share the memory (no second copy of the model)."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[start:start + rows]
        start += rows
    return fused


def fast_llama(model) -> FastLlama | None:
    """The fast decoder for a transformers model where it applies, else None: a plain Llama
    (default rotary embedding, no biases, SiLU) in fp32 on the CPU, and genkit's kernels built."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama" or type(model).__name__ != "LlamaForCausalLM":
        return None
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    plain = (
        rope.get("rope_type", "default") == "default"
        and not getattr(cfg, "attention_bias", False)
        and not getattr(cfg, "mlp_bias", False)
        and getattr(cfg, "hidden_act", "silu") == "silu"
        and getattr(model, "hf_quantizer", None) is None
        and getattr(model, "hf_device_map", None) is None
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    )
    if not plain or not kernels.available():
        return None
    # Built on first use, often inside inference_mode; the fused weights must still be normal
    # tensors, since transformers' Linears now view them (and may run with autograd later).
    with torch.inference_mode(False), torch.no_grad():
        return FastLlama(model)


def attention_mask_4d(attention_mask: torch.Tensor, n: int):
    """Boolean (batch, 1, n, length) mask for n new tokens at the end: causal among them and
    blind to padding. None when nothing is masked (one token, no padding): SDPA runs faster."""
    length = attention_mask.shape[1]
    if n == 1 and bool(attention_mask.all()):
        return None
    keys = torch.arange(length, device=attention_mask.device)
    queries = torch.arange(length - n, length, device=attention_mask.device)
    causal = keys[None, :] <= queries[:, None]  # (n, length)
    return (causal[None] & attention_mask[:, None, :].bool()).unsqueeze(1)

"""One decoder for the GGUF architectures genkit runs natively, driven by a few knobs.

Llama, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 are the same pre-norm transformer with small
differences: biases on q/k/v, RMS norms on q and k per head, norms after attention and MLP,
fused q/k/v and gate/up tensors, a scaled embedding, a tanh-GELU instead of SiLU, soft-capped scores and logits, and layers that
alternate between a sliding window and full attention with their own rotary bases. `Spec` names
those knobs; the rest (shapes, bases, windows, scales) comes from the transformers config that
`AutoConfig` reads from the file's metadata, so the forward pass computes what transformers'
own model computes with the same weights (the tests check logits and greedy tokens).

Weights stay in the file (gguf_file.py). A decode step runs every layer in one call of the C++
DecodeStack (DecodeLlama's, given the spec's knobs); prompts and Gemma 2's soft-capped scores go
through the per-layer forward below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from genkit.errors import GenkitError
from genkit.native.gguf_file import EmbeddingRows, GGUFFile, PartsLinear
from genkit.native.llama import DecodeLlama, attention_mask_4d, rotary_partner


@dataclass(frozen=True)
class Spec:
    """What an architecture adds to a plain Llama layer."""

    permuted_qk: bool = False  # llama.cpp stores q/k rows in interleaved rotary pairs: rotated as they are
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3, gemma3: an RMS norm over each head of q and k
    post_norms: bool = False  # gemma2/3: norms on the attention and MLP outputs too
    embed_scale: bool = False  # gemma: embeddings times sqrt(hidden)
    gelu: bool = False  # gemma: gelu(tanh) GLU instead of silu

    @property
    def plain(self) -> bool:
        """Whether the layers are exactly DecodeLlama's."""
        return not (self.qkv_bias or self.qk_norm or self.post_norms or self.gelu)


SPECS = {
    "llama": Spec(permuted_qk=True),
    "qwen2": Spec(qkv_bias=True),
    "qwen3": Spec(qk_norm=True),
    "gemma2": Spec(post_norms=True, embed_scale=True, gelu=True),
    "gemma3": Spec(qk_norm=True, post_norms=True, embed_scale=True, gelu=True),
    "phi3": Spec(),  # fused q/k/v and gate/up tensors, read as they are (see _layer)
}


def _inverse_frequencies(config, layer_type: str | None):
    """(inverse frequencies, attention factor) of the rotary embedding as transformers computes
    them for this layer type (its own base, and scaling: llama3, linear, yarn... via transformers)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters or {}
    keyed = layer_type is not None and layer_type in params
    if keyed:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        inv, factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **({"layer_type": layer_type} if keyed else {}))
        return inv.float(), float(factor)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0


class RopeTable:
    """cos and sign-folded sin (positions, head_dim) of one layer type, computed for the positions
    in use and extended by doubling (a 32k-position table for every model costs a second at load)."""

    def __init__(self, config, layer_type: str | None, limit: int, interleaved: bool = False,
                 divisors: torch.Tensor | None = None):
        self.inv, self.factor = _inverse_frequencies(config, layer_type)
        if divisors is not None:  # rope_freqs.weight (see GGUFDecoder._rope)
            self.inv = self.inv / divisors
        self.limit = limit
        # interleaved pairs (2k, 2k + 1) take columns k and k + d/2 of the rotate-half tables
        half = self.inv.shape[0]
        self.order = torch.arange(2 * half).view(2, half).T.reshape(-1) if interleaved else None
        self._extend(min(limit, 1024))

    def _extend(self, length: int) -> None:
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), self.inv)
        self.cos = torch.cat([freqs, freqs], -1).cos() * self.factor
        self.sin = torch.cat([-freqs, freqs], -1).sin() * self.factor
        if self.order is not None:
            self.cos, self.sin = self.cos[:, self.order].contiguous(), self.sin[:, self.order].contiguous()

    def reach(self, positions: torch.Tensor) -> None:
        """Extend the table to cover `positions`."""
        need = int(positions.max()) + 1
        if need > self.cos.shape[0]:
            self._extend(max(need, min(2 * self.cos.shape[0], self.limit)))

    def __call__(self, positions: torch.Tensor):
        """(cos, sin) rows for `positions` (any shape), each (..., 1, head_dim) to broadcast over heads."""
        self.reach(positions)
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)


class GGUFDecoder(DecodeLlama):
    """A GGUF file's model, its weights read in place; used through NativeRunner."""

    mode = "gguf-native"
    continuous_batching = True  # forward_transformers over the continuous batcher's cache (engine/continuous.py)

    def __init__(self, path: Path, config, generation_config, index: dict | None = None,
                 byte_activations: bool = False):
        self.file = f = GGUFFile(path, index, byte_activations)
        arch = f.architecture
        if arch not in SPECS:
            raise GenkitError(f"{path.name}: architecture {arch!r} does not run natively (genkit runs "
                              f"{', '.join(sorted(SPECS))}); add --dequantize to load it through transformers")
        self.spec = spec = SPECS[arch]
        self.interleaved_rope = spec.permuted_qk
        self.architecture = arch
        self.config, self.generation_config = config, generation_config
        self.device, self.dtype = torch.device("cpu"), torch.float32
        cfg = config.to_dict()
        self.read_shape(cfg)
        names = [n for n in f.tensors if n.startswith("blk.") or n in ("token_embd.weight", "output.weight")]
        f.check_types(names)
        self.layers = [self._layer(i) for i in range(self.n_layers)]
        hidden = config.hidden_size
        embed = EmbeddingRows(f, "token_embd.weight", math.sqrt(hidden) if spec.embed_scale else None)
        head = PartsLinear.from_file(f, ["output.weight" if "output.weight" in f.tensors else "token_embd.weight"])
        self.embed, self.head, self.norm = embed, head, f.floats("output_norm.weight")
        self._rope(config)
        self.layer_types = getattr(config, "layer_types", None) or ["full_attention"] * self.n_layers
        self.window = getattr(config, "sliding_window", None)
        self.scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.attn_softcap = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

    def _rope(self, config) -> None:
        """One cos/sin table per layer type (gemma: local and global bases). Llama 3.1+ files keep
        their rope scaling as a tensor, rope_freqs.weight: each frequency's divisor, which
        llama.cpp applies and transformers' GGUF reader does not (it reads no scaling for llama)."""
        length = config.max_position_embeddings
        types = set(getattr(config, "layer_types", None) or [None])
        divisors = self.file.floats("rope_freqs.weight") if "rope_freqs.weight" in self.file.tensors else None
        self.tables = {t: RopeTable(config, t, length, self.interleaved_rope, divisors) for t in types}
        first = next(iter(self.tables.values()))
        self.cos, self.sin_signed = first.cos, first.sin

    def cover_positions(self, positions: torch.Tensor) -> None:
        """DecodeLlama's forward (plain stacks) reads self.cos / self.sin_signed: the first table,
        extended to the positions in use (in full, Llama 3's 131k positions take 67 MB)."""
        first = next(iter(self.tables.values()))
        first.reach(positions)
        self.cos, self.sin_signed = first.cos, first.sin

    def _layer(self, i: int) -> dict:
        f, spec, p = self.file, self.spec, f"blk.{i}."
        # phi3 stores q/k/v as one tensor and gate/up as one (ffn_up, gate first): used as they are
        fused_qkv, fused_gate_up = p + "attn_qkv.weight" in f.tensors, p + "ffn_gate.weight" not in f.tensors
        qkv = [p + "attn_qkv.weight"] if fused_qkv else [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]
        gate_up = [p + "ffn_up.weight"] if fused_gate_up else [p + "ffn_gate.weight", p + "ffn_up.weight"]
        layer = {
            "attn_norm": f.floats(p + "attn_norm.weight"),
            "qkv": PartsLinear.from_file(f, qkv),
            "o": PartsLinear.from_file(f, [p + "attn_output.weight"]),
            "ffn_norm": f.floats(p + "ffn_norm.weight"),
            "gate_up": PartsLinear.from_file(f, gate_up),
            "down": PartsLinear.from_file(f, [p + "ffn_down.weight"]),
        }
        if spec.qkv_bias:
            layer["qkv_bias"] = torch.cat([f.floats(p + f"attn_{x}.bias") for x in "qkv"])
        if spec.qk_norm:
            layer["q_norm"], layer["k_norm"] = f.floats(p + "attn_q_norm.weight"), f.floats(p + "attn_k_norm.weight")
        if spec.post_norms:
            layer["post_attn_norm"] = f.floats(p + "post_attention_norm.weight")
            layer["post_ffn_norm"] = f.floats(p + "post_ffw_norm.weight")
        return layer

    def get_output_embeddings(self):
        return self.head

    def forward(self, tokens, positions, cache, start: int, attention_mask, logits_for, hidden: bool = False):
        if self.spec.plain and self.attn_softcap is None and len(self.tables) == 1 and self.window is None:
            return super().forward(tokens, positions, cache, start, attention_mask, logits_for, hidden)
        if self.attn_softcap is None and tokens.shape[1] == 1 and cache.fusable() and self.decode_stack() is not None:
            return self._stack_forward(tokens, positions, cache, start, attention_mask, logits_for, hidden)
        return self._forward(tokens, positions, cache, start, attention_mask, logits_for, hidden)

    def _configure_stack(self, stack) -> None:
        """The spec's knobs on DecodeLlama's C++ stack: q/k/v biases, q/k norms, post norms, gelu,
        the attention scale, and each layer's sliding window and rotary table."""
        order = list(self.tables)
        stack.set_options(self.scale, self.spec.gelu, self.interleaved_rope)
        for i, L in enumerate(self.layers):
            kind = self.layer_types[i]
            window = self.window if kind == "sliding_attention" and self.window else 0
            stack.add_extras(i, L.get("qkv_bias"), L.get("q_norm"), L.get("k_norm"), L.get("post_attn_norm"),
                             L.get("post_ffn_norm"), window, order.index(kind) if kind in order else 0)

    def _stack_forward(self, tokens, positions, cache, start: int, attention_mask, logits_for, hidden: bool):
        """One new token per row, every layer in one DecodeStack call; _forward's contract."""
        b = tokens.shape[0]
        x = self.embed[tokens].reshape(b, -1).contiguous()
        tables = list(self.tables.values())
        for table in tables:
            table.reach(positions)
        cos = torch.stack([t.cos[positions[:, 0]] for t in tables])
        sin = torch.stack([t.sin[positions[:, 0]] for t in tables])
        first = (attention_mask == 0).sum(-1)
        return self._stack_step(self.decode_stack(), x, cos, sin, cache, start, first, logits_for, hidden)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head over the final norm, soft-capped where the model caps its logits (gemma2)."""
        logits = super()._logits(x)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _rms(self, x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _forward(self, tokens, positions, cache, start: int, attention_mask, logits_for, hidden: bool):
        """DecodeLlama.forward's contract, per layer in Python, with every knob of the spec."""
        b, n = tokens.shape
        x = self.embed[tokens]
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        end = start + n
        masks = {t: self._mask(attention_mask, n, t) for t in set(self.layer_types)}
        rotations = {t: table(positions) for t, table in self.tables.items()}
        states = []
        for i, L in enumerate(self.layers):
            if hidden:
                states.append(x)
            kind = self.layer_types[i]
            qkv = L["qkv"](x, L["attn_norm"], self.eps)
            if "qkv_bias" in L:
                qkv = qkv + L["qkv_bias"]
            q = qkv[..., : hq * d].view(b, n, hq, d)
            k = qkv[..., hq * d:(hq + hk) * d].view(b, n, hk, d)
            v = qkv[..., (hq + hk) * d:].view(b, n, hk, d).transpose(1, 2)
            if "q_norm" in L:
                q, k = self._rms(q, L["q_norm"]), self._rms(k, L["k_norm"])
            cos, sin = rotations[kind if kind in rotations else next(iter(rotations))]
            q = (q * cos + rotary_partner(q, self.interleaved_rope) * sin).transpose(1, 2)
            k = (k * cos + rotary_partner(k, self.interleaved_rope) * sin).transpose(1, 2)
            keys, values = cache.update(i, k, v, start, end)
            attn = self._attend(q, keys, values, masks[kind]).transpose(1, 2).reshape(b, n, hq * d)
            out = L["o"](attn)
            x = x + (self._rms(out, L["post_attn_norm"]) if "post_attn_norm" in L else out)
            gate_up = L["gate_up"](x, L["ffn_norm"], self.eps)
            if self.spec.gelu:
                inner = gate_up.shape[-1] // 2
                out = L["down"](F.gelu(gate_up[..., :inner], approximate="tanh") * gate_up[..., inner:])
            else:
                out = L["down"](gate_up, glu=True)
            x = x + (self._rms(out, L["post_ffn_norm"]) if "post_ffn_norm" in L else out)
        if hidden:
            states.append(self._rms(x, self.norm))
        logits = self._logits(x[:, -logits_for:] if logits_for else x) if logits_for is not None else None
        return (logits, tuple(states)) if hidden else logits

    def _mask(self, attention_mask, n: int, layer_type: str):
        """The boolean attention mask of DecodeLlama, narrowed to the window on sliding layers."""
        mask = attention_mask_4d(attention_mask, n)
        if layer_type != "sliding_attention" or not self.window or attention_mask.shape[1] <= self.window:
            return mask
        length = attention_mask.shape[1]
        keys = torch.arange(length)
        queries = torch.arange(length - n, length)
        near = (queries[:, None] - keys[None, :]) < self.window
        base = mask if mask is not None else torch.ones(1, 1, n, length, dtype=torch.bool)
        return base & near

    def _attend(self, q, keys, values, mask):
        if self.attn_softcap is None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
        groups = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        scores = q @ keys.transpose(-1, -2) * self.scale
        scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        if mask is not None:
            # the most negative float, not -inf: a padding row masked whole stays finite
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return scores.softmax(-1) @ values

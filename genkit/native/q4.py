"""Native 4-bit mode: run a Llama-architecture GGUF's Q4_0 / Q4_1 weights as they are.

Instead of dequantising the GGUF into fp32 (538 MB for the embedded model, read once per token),
every linear layer keeps its 4-bit blocks, about 84 MB in all. Two ways to multiply them:

- genkit's own AVX2 kernels (genkit/native/kernels.cpp), the default where they build: the raw
  GGUF blocks, read once per product on all threads, against activations quantised per block of
  32 to int16 (about 1e-5 relative error, so greedy output matches the fp32 path).
- torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`, group size 32, bf16 activations), the
  fallback. Its dequantisation is `(q - 8) * scale + zero` per group, so GGUF blocks map onto it
  exactly:

    Q4_1 block (32 weights):  w = q * d + m   ->  scale = d, zero = m + 8 d
    Q4_0 block (32 weights):  w = (q - 8) * d ->  scale = d, zero = 0

The forward pass is genkit/native/llama.py's DecodeLlama, fp32 everywhere outside the
products. Architectures other than Llama are refused with a clear message, not guessed at.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genkit.errors import GenkitError
from genkit.native import kernels
from genkit.native.llama import DecodeLlama, _Config, glu_input

GROUP = 32
Q4_0, Q4_1, Q8_0, F16, F32 = "Q4_0", "Q4_1", "Q8_0", "F16", "F32"


# ---------------------------------------------------------------- reading GGUF blocks


def _blocks(t, bytes_per_block: int) -> np.ndarray:
    rows = t.data.shape[0]
    return np.ascontiguousarray(t.data).reshape(rows, -1, bytes_per_block)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, :, start:start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def q4_blocks(t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes 0..15 as (rows, cols), scale (rows, groups), zero (rows, groups)) of a Q4 tensor."""
    kind = t.tensor_type.name
    if kind == Q4_1:
        b = _blocks(t, 20)
        d, m, qs = _f16(b, 0), _f16(b, 2), b[:, :, 4:]
        zero = m + 8 * d
    elif kind == Q4_0:
        b = _blocks(t, 18)
        d, qs = _f16(b, 0), b[:, :, 2:]
        zero = np.zeros_like(d)
    else:
        raise ValueError(kind)
    # Within a block, byte j holds weight j in its low nibble and weight j + 16 in its high one.
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(b.shape[0], -1)
    return codes, d, zero


def dequantize(t) -> torch.Tensor:
    """A whole tensor as float32 (for embeddings, norms and the output head)."""
    kind = t.tensor_type.name
    if kind == F32:
        return torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(_shape(t))
    if kind == F16:
        return torch.from_numpy(np.array(t.data, dtype=np.float16).astype(np.float32)).reshape(_shape(t))
    if kind == Q8_0:
        b = _blocks(t, 34)
        d = _f16(b, 0)
        q = b[:, :, 2:].copy().view(np.int8).astype(np.float32)
        return torch.from_numpy((q * d[..., None]).reshape(b.shape[0], -1))
    if kind in (Q4_0, Q4_1):
        codes, d, zero = q4_blocks(t)
        w = (codes.reshape(codes.shape[0], -1, GROUP).astype(np.float32) - 8) * d[..., None] + zero[..., None]
        return torch.from_numpy(w.reshape(codes.shape[0], -1).astype(np.float32))
    raise GenkitError(f"native 4-bit mode cannot read GGUF tensor {t.name} of type {kind}")


def _shape(t):
    return tuple(int(x) for x in reversed(t.shape)) if len(t.shape) > 1 else (int(t.shape[0]),)


# ---------------------------------------------------------------- int4 linear layers


@dataclass
class Int4Linear:
    packed: torch.Tensor  # torch's int4 CPU layout
    scale_zero: torch.Tensor  # (in_features / 32, out_features, 2) bf16
    out_features: int

    @classmethod
    def from_gguf(cls, tensors: list, row_orders: list | None = None) -> "Int4Linear":
        """One layer from one or more GGUF tensors stacked along the output dimension (fused
        q/k/v or gate/up), each with an optional row order (undoing llama.cpp's q/k permutation)."""
        codes, scales, zeros = [], [], []
        for i, t in enumerate(tensors):
            c, d, z = q4_blocks(t)
            order = row_orders[i] if row_orders else None
            if order is not None:
                c, d, z = c[order], d[order], z[order]
            codes.append(c), scales.append(d), zeros.append(z)
        c = torch.from_numpy(np.concatenate(codes)).to(torch.int32)
        sz = torch.stack([torch.from_numpy(np.concatenate(scales)), torch.from_numpy(np.concatenate(zeros))], -1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.contiguous(), 2)
        return cls(packed, sz.transpose(0, 1).contiguous().to(torch.bfloat16), c.shape[0])

    def __call__(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                 glu: bool = False) -> torch.Tensor:
        """fp32 in and out; the kernel itself wants bf16 (30x slower with fp32 activations)."""
        x = _rms(glu_input(x) if glu else x, norm, eps)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scale_zero)
        return y.reshape(*shape[:-1], self.out_features).float()


@dataclass
class GGUFLinear:
    """A layer kept as raw GGUF blocks, multiplied by genkit's kernels (fp32 in and out)."""

    blocks: torch.Tensor  # uint8, the rows' blocks one after another
    kind: str  # Q4_0, Q4_1 or Q8_0
    in_features: int
    out_features: int
    byte_activations: bool = False  # activations as signed bytes: faster, drifts from fp32

    @classmethod
    def from_gguf(cls, tensors: list, row_orders: list | None = None) -> "GGUFLinear":
        kinds = {t.tensor_type.name for t in tensors}
        if len(kinds) != 1:
            raise GenkitError(f"native 4-bit mode cannot fuse tensors of types {sorted(kinds)}")
        kind = kinds.pop()
        rows = []
        for i, t in enumerate(tensors):
            b = _blocks(t, kernels.BLOCK_BYTES[kind])
            order = row_orders[i] if row_orders else None
            rows.append(b[order] if order is not None else b)
        b = np.concatenate(rows)
        return cls(torch.from_numpy(b.reshape(-1)), kind, b.shape[1] * kernels.FORMATS[kind].weights, b.shape[0])

    def __call__(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                 glu: bool = False) -> torch.Tensor:
        """x times the weight, after an RMS norm (`norm`) or the MLP's silu(gate) * up (`glu`),
        both done inside the kernel."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()
        y = kernels.gguf_matmul(x, self.blocks, self.kind, self.in_features, norm, eps, glu, self.byte_activations)
        return y.reshape(*shape[:-1], self.out_features)

    def kernel_weight(self):
        """([blocks], [kind]) as kernels.decode_stack's layers take them."""
        return [self.blocks], [kernels.kind_code(self.kind, self.byte_activations)]


def _rms(x: torch.Tensor, norm: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x if norm is None else F.rms_norm(x, (x.shape[-1],), norm, eps)


@dataclass
class DenseHead:
    """A full-precision output head (for GGUF files whose head is F16 / F32)."""

    weight: torch.Tensor

    def __call__(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
        return F.linear(_rms(x, norm, eps).to(self.weight.dtype), self.weight).float()


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary permutation of q/k weights."""
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(-1)


# ---------------------------------------------------------------- the model


class Q4Llama(DecodeLlama):
    """A Llama decoder over native 4-bit GGUF weights; used through `NativeRunner`."""

    def __init__(self, gguf_path: Path, config_dir: Path, byte_activations: bool = False):
        from transformers import GenerationConfig

        cfg = json.loads((config_dir / "config.json").read_text())
        if cfg.get("model_type") != "llama":
            raise GenkitError(f"native 4-bit mode supports Llama-architecture GGUF files, not {cfg.get('model_type')}")
        self.config = _Config(cfg)
        self.generation_config = GenerationConfig.from_pretrained(config_dir)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.read_shape(cfg)
        # genkit's kernels where they build; torch's int4 kernel otherwise.
        build = _gguf_model if kernels.available() else _int4_model
        self.setup(cfg, *build(self, gguf_path, config_dir))
        if byte_activations and build is _gguf_model:
            # The layers' Q4 products only: the Q8_0 head streams 30 MB a step and is bound by
            # memory, where byte activations measured slower (1.73 ms against 1.60).
            for layer in self.layers:
                for part in layer.values():
                    if isinstance(part, GGUFLinear) and part.kind != "Q8_0":
                        part.byte_activations = True
        self.mode = "genkit-kernels" if build is _gguf_model else "torch-int4"


def _gguf_model(model: "Q4Llama", gguf_path: Path, config_dir: Path):
    """Embeddings, head, final norm and layers over the raw GGUF blocks (genkit's kernels)."""
    from gguf import GGUFReader

    t = _tensors(GGUFReader(str(gguf_path)), gguf_path)
    embed = dequantize(t["token_embd.weight"])
    head_t = t.get("output.weight") or t["token_embd.weight"]  # tied embeddings have no output tensor
    if head_t.tensor_type.name in kernels.GGUF_KINDS:
        head = GGUFLinear.from_gguf([head_t])
    else:
        head = DenseHead(dequantize(head_t))
    q_rows = _unpermute_rows(model.n_heads * model.head_dim, model.n_heads)
    k_rows = _unpermute_rows(model.n_kv * model.head_dim, model.n_kv)
    layers = []
    for i in range(model.n_layers):
        p = f"blk.{i}."
        layers.append({
            "attn_norm": dequantize(t[p + "attn_norm.weight"]),
            "ffn_norm": dequantize(t[p + "ffn_norm.weight"]),
            "qkv": GGUFLinear.from_gguf(
                [t[p + "attn_q.weight"], t[p + "attn_k.weight"], t[p + "attn_v.weight"]], [q_rows, k_rows, None]
            ),
            "o": GGUFLinear.from_gguf([t[p + "attn_output.weight"]]),
            "gate_up": GGUFLinear.from_gguf([t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"]]),
            "down": GGUFLinear.from_gguf([t[p + "ffn_down.weight"]]),
        })
    return embed, head, dequantize(t["output_norm.weight"]), layers


def _int4_model(model: "Q4Llama", gguf_path: Path, config_dir: Path):
    """The same pieces over torch's int4 kernel (packed once, cached beside the model)."""
    w = _packed_weights(model, gguf_path, config_dir)
    head = DenseHead(w["head"])  # fp16: F.linear streams fastest on these CPUs for a full-precision head
    lin = lambda name: Int4Linear(w[name + ".packed"], w[name + ".scale_zero"], w[name + ".scale_zero"].shape[1])
    layers = [
        {
            "attn_norm": w[f"{i}.attn_norm"].float(),
            "ffn_norm": w[f"{i}.ffn_norm"].float(),
            "qkv": lin(f"{i}.qkv"),
            "o": lin(f"{i}.o"),
            "gate_up": lin(f"{i}.gate_up"),
            "down": lin(f"{i}.down"),
        }
        for i in range(model.n_layers)
    ]
    return w["embed"].float(), head, w["norm"].float(), layers


def _tensors(reader, gguf_path: Path) -> dict:
    t = {x.name: x for x in reader.tensors}
    kinds = {x.tensor_type.name for n, x in t.items() if n.startswith("blk.") and x.data.ndim == 2}
    if not kinds <= {Q4_0, Q4_1}:
        raise GenkitError(
            f"{gguf_path.name}: native 4-bit mode runs Q4_0 / Q4_1 weights; this file has {', '.join(sorted(kinds))}"
        )
    return t


def _packed_weights(model: "Q4Llama", gguf_path: Path, cache_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor the forward pass needs, packed for the int4 kernel.

    Packing takes seconds (parsing the GGUF, unpacking nibbles, torch's packing), so the result
    is kept beside the converted model in genkit's cache. torch's packed layout may differ
    between releases and CPU instruction sets, so both are part of the file name."""
    from safetensors.torch import load_file, save_file

    key = f"{torch.__version__.split('+')[0]}-{torch.backends.cpu.get_cpu_capability()}".lower()
    path = cache_dir / f"native-q4-{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception:
            path.unlink(missing_ok=True)  # corrupt: rebuild below
    w = _pack_from_gguf(model, gguf_path)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        save_file(w, str(tmp))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache still works, only slower to start
    return w


def _pack_from_gguf(model: "Q4Llama", gguf_path: Path) -> dict[str, torch.Tensor]:
    from gguf import GGUFReader

    t = _tensors(GGUFReader(str(gguf_path)), gguf_path)
    w = {"embed": dequantize(t["token_embd.weight"]).to(torch.bfloat16)}
    # The output head: its own tensor, or the embeddings when they are tied. fp16 F.linear
    # streams fastest on these CPUs for a full-precision head.
    head = t.get("output.weight")
    w["head"] = (dequantize(head) if head is not None else w["embed"].float()).to(torch.float16)
    w["norm"] = dequantize(t["output_norm.weight"]).to(torch.bfloat16)
    q_rows = _unpermute_rows(model.n_heads * model.head_dim, model.n_heads)
    k_rows = _unpermute_rows(model.n_kv * model.head_dim, model.n_kv)
    for i in range(model.n_layers):
        p = f"blk.{i}."
        w[f"{i}.attn_norm"] = dequantize(t[p + "attn_norm.weight"]).to(torch.bfloat16)
        w[f"{i}.ffn_norm"] = dequantize(t[p + "ffn_norm.weight"]).to(torch.bfloat16)
        parts = {
            "qkv": ([t[p + "attn_q.weight"], t[p + "attn_k.weight"], t[p + "attn_v.weight"]], [q_rows, k_rows, None]),
            "o": ([t[p + "attn_output.weight"]], None),
            "gate_up": ([t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"]], None),
            "down": ([t[p + "ffn_down.weight"]], None),
        }
        for name, (tensors, orders) in parts.items():
            layer = Int4Linear.from_gguf(tensors, orders)
            w[f"{i}.{name}.packed"] = layer.packed
            w[f"{i}.{name}.scale_zero"] = layer.scale_zero
    return w

"""Weight-only 8-bit mode (`--native-8bit`): an fp32 Llama's weights as Q8_0 blocks.

Decoding one token reads every weight once, so on the CPU a step takes as long as the weights
take to stream from memory. Q8_0 keeps 32 weights in 34 bytes (an fp16 scale and 32 signed
bytes, w = q * d): 3.8x fewer bytes than fp32, and the products run through the same kernels as
GGUF files run natively (genkit/native/kernels.cpp), against activations kept at int16 precision.
Embeddings, norms and everything outside the products stay in fp32.

The quantisation is symmetric per block: d = max|w| / 127, q = round(w / d), so a weight is off by
at most d / 2. Greedy output can drift from the fp32 path where two tokens are nearly tied;
`genkit bench --native-8bit` reports whether it does.
"""

from __future__ import annotations

import torch

from genkit.errors import GenkitError
from genkit.native import kernels
from genkit.native.gguf_file import PartsLinear
from genkit.native.llama import DecodeLlama, DenseLinear, FastLlama, fast_llama

GROUP = 32  # weights per Q8_0 block


def q8_0_blocks(w: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) float weight as Q8_0 blocks, rows one after another (uint8, flat)."""
    rows, cols = w.shape
    if cols % GROUP:
        raise GenkitError(f"--native-8bit needs layer widths that are multiples of {GROUP}; this model has {cols}")
    groups = w.detach().float().reshape(rows, cols // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / 127).to(torch.float16)  # stored as fp16: quantise with that value
    exact = scale.float().unsqueeze(-1)
    codes = torch.where(exact > 0, groups / exact.clamp_min(1e-30), 0.0).round().clamp(-127, 127).to(torch.int8)
    blocks = torch.cat([scale.view(torch.uint8).reshape(rows, -1, 2), codes.view(torch.uint8)], dim=-1)
    return blocks.reshape(-1).contiguous()


def q8_linear(dense: DenseLinear) -> PartsLinear:
    out_features, in_features = dense.weight.shape
    return PartsLinear([q8_0_blocks(dense.weight)], [kernels.FORMATS["Q8_0"].code], in_features, out_features)


class Int8Llama(DecodeLlama):
    """A transformers Llama's layers and head as Q8_0 blocks; used through NativeRunner."""

    mode = "genkit-kernels-q8_0"

    def __init__(self, hf):
        fast = fast_llama(hf)
        if not isinstance(fast, FastLlama):
            raise GenkitError("--native-8bit runs plain Llama models in float32 on a CPU with AVX2 (genkit's "
                              "kernels); drop --native-8bit for this model")
        self.config, self.generation_config = hf.config, hf.generation_config
        self.device, self.dtype = torch.device("cpu"), torch.float32
        layers = [{name: q8_linear(part) if isinstance(part, DenseLinear) else part for name, part in L.items()}
                  for L in fast.layers]
        self.setup(hf.config.to_dict(), fast.embed, q8_linear(fast.head), fast.norm, layers)

"""Every GGUF block format genkit multiplies (genkit/native/formats.def, blocks.h, kernels.cpp)
against gguf's own numpy dequantisation (gguf.quants) on random blocks."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGML_QUANT_SIZES
from gguf.quants import dequantize

from genkit.native import kernels

pytestmark = pytest.mark.usefixtures("needs_kernels")

# Where each format keeps its fp16 scales (ggml's block structs): random bytes there could be
# inf / nan, so the tests write small finite scales instead.
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
BLOCK_KINDS = sorted(kernels.GGUF_KINDS)


def random_rows(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, bytes per row) of random blocks of `kind`, as a GGUF file stores a (rows, cols) weight."""
    f = kernels.FORMATS[kind]
    rng = np.random.default_rng(seed)
    if f.weights == 1:  # F16: the weights themselves
        return rng.normal(0, 0.1, (rows, cols)).astype(np.float16).view(np.uint8)
    blocks = rng.integers(0, 256, (rows, cols // f.weights, f.bytes), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        scales = rng.uniform(-0.02, 0.02, blocks.shape[:2]).astype(np.float16)
        blocks[:, :, at:at + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def reference(raw: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).astype(np.float64))


def assert_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, tolerance: float) -> None:
    """|y - x @ w.T| within `tolerance` of sum |x| |w| for every output (float64 reference)."""
    x = x.double()
    assert y.shape == (x.shape[0], w.shape[0])
    assert ((y.double() - x @ w.T).abs() <= tolerance * (x.abs() @ w.abs().T) + 1e-7).all()


def test_one_table_for_python_cpp_and_gguf():
    """kernels.py reads formats.def, kernels.cpp includes it: both agree, and with gguf's sizes."""
    built = {name: (code, w, b) for name, code, w, b in kernels.built_formats()}
    assert built == {f.name: (f.code, f.weights, f.bytes) for f in kernels.FORMATS.values()}
    for f in kernels.FORMATS.values():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[f.name]] == (f.weights, f.bytes)
    assert set(kernels.FORMATS) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                                    "Q4_K", "Q5_K", "Q6_K"}


@pytest.mark.parametrize("rows", [1, 3, 6, 20, 37])
@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_block_product_equals_gguf_dequantisation(kind, rows):
    """x @ W.T over the raw blocks equals the product with gguf.quants' dequantised W (in float64).
    Tolerance, relative to sum |x| |w| per output: 2e-6 where rows are decoded to floats (float32
    rounding only), 5e-5 for the integer formats' 16-bit activations below 8 rows (per 32
    inputs for Q4_0..Q5_1, per 256 as two byte planes for the k-quants; per 32 inputs from 8
    rows, the integer panels; measured: at most 8e-6); bytes would miss it by
    two orders of magnitude. 43 weight rows: the panels' tiles of 4 rows end with a partial one;
    20 and 37 rows: 3 and 5 panels of 8, the last one partly filled."""
    cols = 512
    raw = random_rows(kind, 43, cols, seed=rows)
    w = reference(raw, kind)
    torch.manual_seed(rows)
    x = torch.randn(rows, cols)
    y = kernels.gguf_matmul(x, torch.from_numpy(raw.reshape(-1)), kind, cols)
    assert_product(y, x, w, 5e-5 if kind in kernels.INTEGER_KINDS else 2e-6)


@pytest.mark.parametrize("kind", kernels.INTEGER_KINDS)
def test_byte_activations_on_every_integer_format(kind):
    """The same blocks times activations quantised to signed bytes (llama.cpp's rounding): within
    byte rounding of the dequantised product, per output, and coarser than the int16 product,
    which a kernel that ignored the flag would return."""
    cols = 512
    raw = random_rows(kind, 40, cols, seed=7)
    w, blocks = reference(raw, kind), torch.from_numpy(raw.reshape(-1))
    torch.manual_seed(7)
    x = torch.randn(3, cols)
    exact = (x.double() @ w.T)
    coarse = kernels.gguf_matmul(x, blocks, kind, cols, byte_activations=True)
    assert_product(coarse, x, w, 1.5e-2)
    assert (coarse.double() - exact).abs().max() > (kernels.gguf_matmul(x, blocks, kind, cols).double() - exact).abs().max()


@pytest.mark.parametrize("kind", kernels.INTEGER_KINDS)
def test_byte_panels_multiply_activations_rounded_per_32(kind):
    """From 8 rows (the integer panels) with byte activations: x rounded to 127 steps of its
    block's largest value per 32 inputs, times the dequantised W, to float rounding (the biases
    that make Q8_0's, Q6_K's and Q3_K's codes unsigned cancel exactly). On CPUs without VNNI the
    panels keep 16-bit activations, which are within 5e-5 of x itself."""
    cols = 512
    raw = random_rows(kind, 43, cols, seed=11)
    w = reference(raw, kind)
    torch.manual_seed(11)
    x = torch.randn(20, cols)
    y = kernels.gguf_matmul(x, torch.from_numpy(raw.reshape(-1)), kind, cols, byte_activations=True)
    blocks = x.double().view(20, -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    rounded = (torch.round(blocks / scale) * scale).view(20, cols)
    if kernels.build_flags() == kernels.CFLAGS:
        assert_product(y, x, w, 5e-5)
    else:
        assert_product(y, rounded, w, 2e-6)
        assert not torch.allclose(rounded, x.double(), rtol=1e-3)


def test_mixed_parts_with_norm_and_glu():
    """One weight stacked from parts of different formats (q/k/v of a Q4_K_M file), after the
    RMS norm or the GLU done in the kernel: the separate products, concatenated."""
    cols = 256
    kinds = ["Q5_0", "Q4_K", "Q6_K", "Q8_0", "F32", "BF16"]
    parts, dense = [], []
    for i, kind in enumerate(kinds):
        if kind in kernels.DENSE:
            w = torch.randn(8 + i, cols).to(torch.float32 if kind == "F32" else torch.bfloat16)
            parts.append(w), dense.append(w.double())
        else:
            raw = random_rows(kind, 8 + i, cols, seed=i)
            parts.append(torch.from_numpy(raw.reshape(-1))), dense.append(reference(raw, kind))
    codes = [kernels.FORMATS[k].code for k in kinds]
    w = torch.cat(dense)
    norm = torch.rand(cols) + 0.5
    for rows in (2, 17):
        x = torch.randn(rows, cols)
        normed = torch.nn.functional.rms_norm(x.double(), (cols,), norm.double(), 1e-6)
        assert_product(kernels.parts_matmul(x, parts, codes, cols, norm, 1e-6), normed, w, 5e-5)
        x2 = torch.randn(rows, 2 * cols)
        glu = torch.nn.functional.silu(x2[:, :cols].double()) * x2[:, cols:].double()
        assert_product(kernels.parts_matmul(x2, parts, codes, cols, glu=True), glu, w, 5e-5)


def test_k_quants_need_whole_super_blocks():
    raw = random_rows("Q4_K", 4, 256)
    with pytest.raises(RuntimeError, match="multiple of 256 for Q4_K"):
        kernels.gguf_matmul(torch.randn(1, 128), torch.from_numpy(raw.reshape(-1)), "Q4_K", 128)

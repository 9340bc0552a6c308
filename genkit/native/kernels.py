"""genkit's own CPU matrix-vector products (kernels.cpp), built on first use.

torch has no product that streams fp32 or GGUF 4-bit weights at memory speed for the one or two
activation rows of a decode step (fp32 `F.linear` reads about 10 GB/s at one row where memory
gives about 36 GB/s on the 2-core CPUs genkit is measured on), so genkit compiles a small
AVX2 extension with torch's own toolchain the first time it is needed (with AVX-512 VNNI's fused
integer products where the CPU has them) and keeps the build in its cache. Where that cannot
work (no AVX2, no compiler) `available()` is False and callers use torch's products instead:
slower, never wrong. GENKIT_REQUIRE_KERNELS=1 (the tests set it where a compiler and AVX2 are
present, CI always) turns that fallback into an error, so a broken kernels.cpp cannot pass
unnoticed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from genkit import paths

SOURCE = Path(__file__).with_name("kernels.cpp")
# Sources besides SOURCE that the build includes: part of the build's digest.
FORMAT_TABLE = Path(__file__).with_name("formats.def")
HEADERS = [Path(__file__).with_name(name) for name in ("blocks.h", "quantized.h", "subblocks.h", "dense.h",
                                                       "int_panels.h", "weights.h", "attention.h")] + [FORMAT_TABLE]


@dataclass(frozen=True)
class Format:
    """A weight format the kernels multiply: its code and block size (formats.def)."""

    name: str
    code: int
    weights: int  # per block
    bytes: int  # per block


def _read_formats() -> dict[str, Format]:
    """formats.def, the table kernels.cpp includes too, parsed here (no build needed)."""
    rows = re.findall(r"^GENKIT_FORMAT\((\w+), (\d+), (\d+), (\d+)\)$", FORMAT_TABLE.read_text(), re.M)
    return {name: Format(name, int(code), int(w), int(b)) for name, code, w, b in rows}


FORMATS = _read_formats()
DENSE = ("F32", "BF16")  # multiplied as torch tensors of that dtype, not as raw bytes
# GGUF block formats the kernels multiply as raw bytes (every format but the dense ones).
GGUF_KINDS = {name: f.code for name, f in FORMATS.items() if name not in DENSE}
BLOCK_BYTES = {name: f.bytes for name, f in FORMATS.items()}
# with integer dot products (quantized.h, subblocks.h), and byte activations as an option; the
# others (F16, Q2_K) are multiplied by decoding rows to floats
INTEGER_KINDS = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
INT8_ACTIVATIONS = 32  # added to an integer kind: the same blocks times activations quantised to bytes
# no-tree-loop-distribute-patterns: GCC would turn the zeroing of a register tile's accumulators
# into a memset and then keep them in memory, a store per FMA (kernels.cpp, panel_tile).
BUILD_NOTICE = "building genkit's CPU kernels (once, 1-2 min)"
log = logging.getLogger("genkit")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fno-tree-loop-distribute-patterns"]
# Where the CPU has AVX-512 VNNI, the integer products fuse a multiply-add and its sum into one
# instruction (quantized.h, madd_add); the vectors stay 256 bits wide, as the AVX2 code is written.
VNNI_CFLAGS = ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni", "-mprefer-vector-width=256"]


def _cpu_has(*features: str) -> bool:
    """Whether /proc/cpuinfo lists every feature (False where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in features)


def build_flags() -> list[str]:
    """The compiler flags for this CPU: CFLAGS, plus VNNI_CFLAGS where it has AVX-512 VNNI."""
    return CFLAGS + (VNNI_CFLAGS if _cpu_has("avx512f", "avx512vl", "avx512bw", "avx512_vnni") else [])


def _cpu_ok() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and os.environ.get("GENKIT_NO_KERNELS") != "1"


def _required() -> bool:
    return os.environ.get("GENKIT_REQUIRE_KERNELS") == "1"


@cache
def _module():
    if not _cpu_ok():
        if _required():
            raise RuntimeError("GENKIT_REQUIRE_KERNELS=1, but this CPU lacks AVX2 or GENKIT_NO_KERNELS=1 is set")
        return None
    sources = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    cflags = build_flags()
    digest = hashlib.sha256(sources + " ".join(cflags).encode()).hexdigest()[:12]
    name = f"genkit_kernels_{digest}"
    build = paths.cache_dir() / "kernels" / f"torch-{torch.__version__.split('+')[0]}-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    built = build / f"{name}.so"
    if built.is_file():
        try:  # import the built library straight away: asking ninja first costs 0.15 s per run
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except ImportError:
            pass  # rebuild below
    # only a build needs torch's toolchain: importing it pulls in setuptools (0.3 s of a run's start)
    from torch.utils import cpp_extension

    log.info(BUILD_NOTICE)
    try:
        return cpp_extension.load(
            name,
            sources=[str(SOURCE)],
            build_directory=str(build),
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a broken toolchain: fall back, say why once
        if _required():
            raise RuntimeError(f"genkit's CPU kernels failed to build in {build}: {exc}") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("CPU kernels unavailable (%s); using torch's slower products", first)
        return None


def available() -> bool:
    return _module() is not None


def library() -> Path | None:
    """The built library in use (under genkit's cache), or None without the kernels."""
    module = _module()
    return None if module is None else Path(module.__file__)


def built_formats() -> list[tuple[str, int, int, int]]:
    """(name, code, weights per block, bytes per block) of every format, as the built library
    has them from formats.def (FORMATS is the same table read by Python)."""
    return _module().formats()


def kind_code(kind: str, byte_activations: bool = False) -> int:
    """The kernels' code for a GGUF block type; INTEGER_KINDS are multiplied with int16 or
    (faster, coarser) byte activations, the other formats with their rows decoded to floats."""
    return GGUF_KINDS[kind] + (INT8_ACTIVATIONS if byte_activations and kind in INTEGER_KINDS else 0)


def parts_matmul(x: torch.Tensor, parts: list[torch.Tensor], kinds: list[int], in_features: int,
                 norm: torch.Tensor | None = None, eps: float = 0.0, glu: bool = False) -> torch.Tensor:
    """x (M, in) float32 times a weight stacked by output rows from parts of any kinds (kernel
    codes: a GGUF kind's raw bytes, or a float32 / bfloat16 (out, in) tensor); `norm` and
    `glu` as for gguf_matmul."""
    return _module().parts_matmul(x, parts, kinds, in_features, norm, eps, glu)


def gguf_matmul(x: torch.Tensor, blocks: torch.Tensor, kind: str, in_features: int,
                norm: torch.Tensor | None = None, eps: float = 0.0, glu: bool = False,
                byte_activations: bool = False) -> torch.Tensor:
    """x (M, in) float32 times a weight kept as raw GGUF blocks (rows in output order). With
    `norm`, x is RMS-normed with that weight first; with `glu`, x is (M, 2 in) and the input is
    silu(first half) * second half."""
    return _module().gguf_matmul(x, blocks, kind_code(kind, byte_activations), in_features, norm, eps, glu)


def dense_matmul(x: torch.Tensor, w: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                 glu: bool = False) -> torch.Tensor:
    """x (M, in) float32 times a contiguous float32 (out, in) weight, for small M; `norm` and
    `glu` as for gguf_matmul."""
    return _module().dense_matmul(x, w, norm, eps, glu)


def decode_attention(qkv, cos, sin, k_cache, v_cache, slot: int, first, n_heads: int, n_kv: int,
                     interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding, KV-cache write and attention of one new token per row (kernels.cpp)."""
    return _module().decode_attention(qkv, cos, sin, k_cache, v_cache, slot, first, n_heads, n_kv, interleaved)


def dense_kind(w: torch.Tensor) -> int:
    """The kernels' code for a dense weight: 3 for float32, 4 for bfloat16."""
    return {torch.float32: 3, torch.bfloat16: 4}[w.dtype]


def decode_stack(n_heads: int, n_kv: int, head_dim: int, eps: float):
    """An empty C++ DecodeStack: add_layer(attn_norm, ffn_norm, qkv parts, their kinds, o parts,
    kinds, gate_up parts, kinds, down parts, kinds) per layer, then forward(x, cos, sin, keys, values, slot, first) runs one decode
    step through every layer (kernels.cpp)."""
    return _module().DecodeStack(n_heads, n_kv, head_dim, eps)

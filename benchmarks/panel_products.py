"""GFLOPS of genkit's GGUF block products at prompt sizes, with 16-bit and byte activations.

Many activation rows (a prompt) make a product bound by arithmetic: this times
`kernels.gguf_matmul` on random blocks (speed does not depend on their values) at the shapes of
a 1B model's attention and MLP-down products, best of --repeats, on --threads threads.

    python benchmarks/panel_products.py --threads 1
    python benchmarks/panel_products.py --rows 8,256 --kinds Q4_K,Q8_0
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from genkit.native import kernels

SHAPES = ((2048, 2048), (2048, 8192))  # (out, in): q/o, down of Llama-3.2-1B


def random_blocks(kind: str, out: int, inp: int, rng: np.random.Generator) -> torch.Tensor:
    """Random blocks of `kind` with their fp16 scales set to 0.01 (finite, moderate products)."""
    f = kernels.FORMATS[kind]
    raw = rng.integers(0, 256, (out, inp // f.weights, f.bytes), dtype=np.uint8)
    half = np.array([0.01], dtype=np.float16).view(np.uint8)
    at = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q4_1": (0, 2), "Q5_1": (0, 2)}
    for offset in at.get(kind, (0,)):
        raw[:, :, offset:offset + 2] = half
    return torch.from_numpy(raw.reshape(out, -1).copy())


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="256", help="comma-separated activation row counts")
    ap.add_argument("--kinds", default="Q4_K,Q6_K,Q8_0,Q5_0,Q4_1")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in kernels.INTEGER_KINDS]
    if unknown:
        ap.error(f"--kinds: {', '.join(unknown)} is not an integer GGUF format; pick from {','.join(kernels.INTEGER_KINDS)}")
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows: {args.rows!r} is not a comma-separated list of row counts")
    if not kernels.available():
        ap.exit(1, "panel_products.py: genkit's CPU kernels are not available on this machine\n")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{'kind':6} {'rows':>5} {'out x in':>11} {'int16 GFLOPS':>13} {'bytes GFLOPS':>13}")
    for kind in kinds:
        for out, inp in SHAPES:
            w = random_blocks(kind, out, inp, rng)
            for n in rows:
                x = torch.randn(n, inp)
                flops = 2 * n * out * inp
                rates = [flops / best_seconds(lambda b=b: kernels.gguf_matmul(x, w, kind, inp, byte_activations=b),
                                              args.repeats) / 1e9 for b in (False, True)]
                print(f"{kind:6} {n:5} {out:5}x{inp:<5} {rates[0]:13.1f} {rates[1]:13.1f}", flush=True)


if __name__ == "__main__":
    main()

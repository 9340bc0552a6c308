"""The cost of constrained output: the same greedy run with and without a JSON schema.

    python benchmarks/structured_cost.py                       # the embedded model, batch 1 and 32
    python benchmarks/structured_cost.py --batches 1 --rounds 5 --model DIR

Run by hand (not in CI), on a quiet machine. One process loads the model once; each round runs
every batch size unconstrained and then constrained, alternating, so both see the same load.
The schema is an array of at least 1000 short strings: no answer can finish it within
--new-tokens, so both runs make exactly --new-tokens tokens per row and the ratio of their
times is the constraint's cost per step (mask computation, unpacking, consuming tokens).
Target (issue 16): at most 1.10x at batch 1 and at batch 32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1000}
PROMPT = "List the names of rivers, towns and mountains you know, as a JSON array of strings."


def timed(lm, prompts: list[str], new_tokens: int, constrained: bool) -> tuple[float, int]:
    import genkit

    extra = {"json_schema": SCHEMA} if constrained else {}
    start = time.perf_counter()
    result = genkit.generate(lm, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **extra)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(r.token_ids) for r in result.results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON object per batch size")
    args = ap.parse_args()

    import genkit

    lm = genkit.load(args.model)
    sizes = [int(b) for b in args.batches.split(",")]
    for size in sizes:  # warm-up: tokenizer wrap for llguidance, kernels, first masks
        timed(lm, [PROMPT] * size, 4, True)
        timed(lm, [PROMPT] * size, 4, False)
    times: dict[tuple[int, bool], list[float]] = {}
    tokens: dict[tuple[int, bool], int] = {}
    for _ in range(args.rounds):
        for size in sizes:
            for constrained in (False, True):
                elapsed, made = timed(lm, [PROMPT] * size, args.new_tokens, constrained)
                times.setdefault((size, constrained), []).append(elapsed)
                tokens[(size, constrained)] = made
    for size in sizes:
        plain, constr = (statistics.median(times[(size, c)]) for c in (False, True))
        row = {
            "batch": size, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "plain_tokens_per_s": round(tokens[(size, False)] / plain, 1),
            "constrained_tokens_per_s": round(tokens[(size, True)] / constr, 1),
            "cost": round(constr / plain, 3),
            "same_token_count": tokens[(size, False)] == tokens[(size, True)],
        }
        if args.json:
            print(json.dumps(row))
        else:
            print(f"batch {size:>3}: unconstrained {row['plain_tokens_per_s']:>7} tok/s, constrained "
                  f"{row['constrained_tokens_per_s']:>7} tok/s, cost {row['cost']:.3f}x "
                  f"(median of {args.rounds}; same token count: {row['same_token_count']})")


if __name__ == "__main__":
    main()

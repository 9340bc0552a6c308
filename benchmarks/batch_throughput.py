"""Throughput of `genkit batch` against plain transformers generate(), measured in one run.

    python benchmarks/batch_throughput.py            # 256 prompts of 5-200 tokens, 64 new tokens
    python benchmarks/batch_throughput.py --n 32     # a quick check

Run by hand (not in CI). One process loads the model once and runs, on the same prompts:
  1. genkit batch (the library path the CLI takes: prepare + execute, writing a JSONL file),
  2. a loop of plain generate(), one prompt at a time,
  3. plain generate() on fixed padded batches of --hf-batch prompts, in input order,
then prints tokens/s, the ratios and whether the greedy texts are identical. Targets: genkit
at least 10x the loop and 1.5x the padded batches. `--loop-every 4` times the (slow) loop on every
4th prompt only: its tokens/s over the same mix of lengths, in a quarter of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# A paragraph to cut prompts from: ordinary English, so the model writes ordinary continuations.
TEXT = """The harbour town woke slowly. Fishermen checked their nets while the bakery on the corner
filled the street with the smell of bread. Children ran to school along the sea wall, counting
the gulls that sat on the posts. In the library, an old map of the coast showed islands that no
longer existed, swallowed by storms two centuries ago. The librarian, a patient woman named Ada,
liked to explain how the tides had reshaped the shore, how the river had moved its mouth three
times, and how the lighthouse had been rebuilt after the great fire. Visitors came in summer to
walk the cliffs, to eat grilled fish at the market and to watch the boats return at dusk. In
winter the town belonged to its people again: the cafés closed early, the wind rattled the
shutters, and everyone knew which neighbour needed help carrying coal up the hill. Scientists
from the university measured the water temperature every week and wrote reports about the
changing currents, the new species of jellyfish and the slow retreat of the kelp forests. The
mayor promised a new harbour wall, then a museum, then a ferry to the islands, and every year
the town voted for him again because he always remembered their names."""


def make_prompts(tok, n: int, lo: int, hi: int, seed: int) -> list[str]:
    """n prompts whose lengths are spread over lo..hi tokens, cut from TEXT at random offsets."""
    ids = tok(" ".join(TEXT.split()), add_special_tokens=False)["input_ids"]
    while len(ids) < hi * 2:
        ids = ids + ids
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - k)
        prompts.append(tok.decode(ids[start:start + k]).strip())
    return prompts


def encode_one(tok, text: str) -> list[int]:
    # genkit batch --raw tokenizes exactly like this (special tokens added, no chat template).
    return tok(text, add_special_tokens=True)["input_ids"]


def cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def run_genkit(lm, prompts, new_tokens, batch_size, max_batch_tokens):
    from genkit import batch as B

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
        opts = B.JobOptions(input=str(src), output=str(out), raw=True, batch_size=batch_size,
                            max_batch_tokens=max_batch_tokens,
                            params={"max_new_tokens": new_tokens, "do_sample": False})
        start = time.perf_counter()
        job = B.prepare(opts)
        B.execute(job, lm)
        elapsed = time.perf_counter() - start
        recs = [json.loads(line) for line in out.read_text().splitlines()]
    failed = [r for r in recs if "error" in r]
    if failed:
        raise SystemExit(f"genkit batch failed on {len(failed)} prompts: {failed[0]['error']}")
    return elapsed, [r["text"] for r in recs], sum(r["completion_tokens"] for r in recs)


def run_loop(lm, encoded, new_tokens, eos):
    import torch

    model, tok = lm.model, lm.tokenizer
    texts, tokens = [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in encoded:
            x = torch.tensor([ids], device=lm.device)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            new = cut_at_eos(out[0, len(ids):].tolist(), eos)
            tokens += len(new)
            texts.append(tok.decode(new, skip_special_tokens=True))
    return time.perf_counter() - start, texts, tokens


def run_padded(lm, encoded, new_tokens, eos, batch):
    import torch

    model, tok = lm.model, lm.tokenizer
    texts, tokens = [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(encoded), batch):
            chunk = encoded[i:i + batch]
            width = max(len(c) for c in chunk)
            x = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, ids in enumerate(chunk):
                x[r, width - len(ids):] = torch.tensor(ids)
                mask[r, width - len(ids):] = 1
            out = model.generate(input_ids=x.to(lm.device), attention_mask=mask.to(lm.device),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            for row in out[:, width:].tolist():
                new = cut_at_eos(row, eos)
                tokens += len(new)
                texts.append(tok.decode(new, skip_special_tokens=True))
    return time.perf_counter() - start, texts, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="number of prompts")
    ap.add_argument("--min-tokens", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=32, help="batch size of the padded generate() baseline")
    ap.add_argument("--batch-size", type=int, default=64, help="genkit batch --batch-size")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="genkit batch --max-batch-tokens")
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the prompt lengths and offsets")
    ap.add_argument("--skip-loop", action="store_true", help="leave out the one-at-a-time loop (slow)")
    ap.add_argument("--loop-every", type=int, default=1,
                    help="time the loop on every K-th prompt only (its tokens/s, on the same length mix)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args()

    import torch

    from genkit import models

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = models.load(args.model)
    tok = lm.tokenizer
    eos = set(lm.model.generation_config.eos_token_id if isinstance(lm.model.generation_config.eos_token_id, list)
              else [lm.model.generation_config.eos_token_id])
    prompts = make_prompts(tok, args.n, args.min_tokens, args.max_tokens, args.seed)
    encoded = [encode_one(tok, p) for p in prompts]
    lengths = sorted(len(e) for e in encoded)
    print(f"model {lm.name} ({lm.model.dtype}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"{args.n} prompts of {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), "
          f"{args.new_tokens} new tokens, greedy", file=sys.stderr)

    # A short warm-up so that no method pays for first-call initialisation.
    with torch.inference_mode():
        lm.model.generate(input_ids=torch.tensor([encoded[0]]), max_new_tokens=2, do_sample=False,
                          pad_token_id=tok.pad_token_id)

    results = {}

    def measure(name, run, *run_args):
        results[name] = run(lm, *run_args)
        seconds, _, tokens = results[name]
        print(f"  {name}: {seconds:.1f} s, {tokens / seconds:.1f} tokens/s", file=sys.stderr, flush=True)

    measure("genkit batch", run_genkit, prompts, args.new_tokens, args.batch_size, args.max_batch_tokens)
    if not args.skip_loop:
        measure("generate() loop", run_loop, encoded[::args.loop_every], args.new_tokens, eos)
    measure(f"generate() padded x{args.hf_batch}", run_padded, encoded, args.new_tokens, eos, args.hf_batch)
    report(results, args)


def report(results: dict, args) -> None:
    g_time, g_texts, g_tokens = results["genkit batch"]
    rows = []
    for name, (t, texts, tokens) in results.items():
        step = args.loop_every if name == "generate() loop" else 1
        same = sum(a == b for a, b in zip(g_texts[::step], texts))
        speedup = (g_tokens / g_time) / (tokens / t)  # genkit's tokens/s over this method's
        rows.append({"method": name, "seconds": round(t, 2), "tokens": tokens, "tokens_per_s": round(tokens / t, 2),
                     "genkit_speedup": round(speedup, 2), "identical_to_genkit": f"{same}/{len(texts)}"})
    targets = {"generate() loop": 10.0, f"generate() padded x{args.hf_batch}": 1.5}
    for row in rows:
        if row["method"] in targets:
            row["target"] = targets[row["method"]]
            row["met"] = row["genkit_speedup"] >= targets[row["method"]]
    if args.json:
        print(json.dumps({"load_average": os.getloadavg()[0], "rows": rows}))
        return
    print(f"{'method':<24} {'seconds':>9} {'tokens':>7} {'tokens/s':>9} {'genkit x':>9} {'identical':>10}  target")
    for r in rows:
        target = f">= {r['target']}x {'met' if r['met'] else 'NOT met'}" if "target" in r else ""
        print(f"{r['method']:<24} {r['seconds']:>9.2f} {r['tokens']:>7} {r['tokens_per_s']:>9.2f} "
              f"{r['genkit_speedup']:>9.2f} {r['identical_to_genkit']:>10}  {target}")
    print(f"load average after the run: {os.getloadavg()[0]:.2f} (other processes share this CPU)", file=sys.stderr)


if __name__ == "__main__":
    main()

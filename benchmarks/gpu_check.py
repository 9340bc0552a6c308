"""Prove genkit's GPU paths on a CUDA machine (run by hand; CI has no GPU).

    python benchmarks/gpu_check.py MODEL_DIR_WITH_CONFIG_AND_TOKENIZER [--out results.json]

The directory needs a config.json and tokenizer files; when it has no weights, a model with
that architecture and random weights is created (the embedded model's 98 MB GGUF cannot travel
to the GPU machines lent here, and speed and parity do not depend on the weights' values).

It checks, on the GPU: `--device-map cuda` / `auto`, bfloat16 and float16, 4-bit (nf4, fp4) and
8-bit bitsandbytes loading, token-for-token greedy parity with transformers' generate() on the
same GPU (genkit's static cache with CUDA graphs, the same without graphs, and the dynamic
cache), and prints batch-1 greedy tokens/s of each beside plain generate(), alternating.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def ensure_weights(d: Path) -> None:
    if any(d.glob("*.safetensors")):
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d))
    model.save_pretrained(d)


def cli_checks(checks: dict[str, list[str]]) -> dict:
    """Run `genkit run --json` once per check, all at once (each is a fresh process that
    imports torch and loads the model: tens of seconds apiece in a row)."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "genkit", "run", "--json", *args],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in checks.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            out[name] = {"error": stderr.strip()[-500:], "rc": p.returncode}
        else:
            rec = json.loads(stdout)
            out[name] = {"tokens": rec["usage"]["completion_tokens"], "text": rec["text"][:40]}
    return out


# genkit's runners on a GPU: the backends (genkit/engine/backends.py) compared.
VARIANTS = {
    "genkit": "static",  # static cache, each decode step one CUDA graph replay
    "genkit_no_graphs": "static-eager",  # static cache, eager steps
    "genkit_dynamic": "transformers",  # transformers' DynamicCache
}


def _on(lm, backend: str):
    """`lm` decoded by another backend: the same weights and tokenizer."""
    from genkit.engine import backends

    return dataclasses.replace(lm, backend=backends.choose(lm.model, backend))


def _timed(fn) -> tuple[float, list]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    ids = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, ids


def speed(lm, n_new: int, runs: int = 3, batch: int = 1) -> dict:
    """Greedy tokens/s of genkit's runners and plain generate(), alternating in each round."""
    import genkit
    from genkit import prompts

    texts = [f"Write a long story about a lighthouse keeper. Chapter {i}." for i in range(batch)]
    ids, mask, _ = prompts.encode(lm, texts, templated=False, max_new_tokens=n_new)
    eos = lm.tokenizer.eos_token_id
    out = {name: [] for name in [*VARIANTS, "transformers"]}
    runners = {name: _on(lm, backend) for name, backend in VARIANTS.items()}  # each keeps its graphs
    for _ in range(runs):
        for name, backend in VARIANTS.items():
            variant = runners[name]
            run = lambda: [r.token_ids for r in genkit.generate(
                variant, texts, raw=True, max_new_tokens=n_new, suppress_tokens=[eos]).results]
            elapsed, _ = _timed(run)
            out[name].append(batch * n_new / elapsed)

        def plain():
            with torch.inference_mode():
                return lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                                         suppress_tokens=[eos], pad_token_id=lm.tokenizer.pad_token_id)

        elapsed, _ = _timed(plain)
        out["transformers"].append(batch * n_new / elapsed)
    best = {k: round(max(v), 1) for k, v in out.items()}
    best["genkit_first_call"] = round(out["genkit"][0], 1)  # includes capturing the graph
    for name in VARIANTS:
        best[f"{name}_ratio"] = round(best[name] / best["transformers"], 2)
    return best


def parity(lm, n_new: int = 64) -> dict:
    """Greedy ids of each genkit runner against generate() on the same GPU (padded batch of 2)."""
    import genkit
    from genkit import prompts

    texts = ["The capital of France is", "Once upon a time, in a land far away, there lived"]
    ids, mask, _ = prompts.encode(lm, texts, templated=False, max_new_tokens=n_new)
    with torch.inference_mode():
        g = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                              pad_token_id=lm.tokenizer.pad_token_id)
    eos = lm.tokenizer.eos_token_id
    theirs = [r[: r.index(eos) + 1] if eos in r else r for r in g[:, ids.shape[1]:].tolist()]
    report = {}
    for name, backend in VARIANTS.items():
        ours = [r.token_ids for r in genkit.generate(_on(lm, backend), texts, raw=True, max_new_tokens=n_new).results]
        same = [a == b for a, b in zip(ours, theirs)]
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ours, theirs)]
        report[name] = {"same": all(same), "first_difference": first_diff}
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--out")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    d = Path(args.model_dir)
    ensure_weights(d)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    m = str(d)
    report["cli"] = cli_checks({
        "device_map_cuda": ["--model", m, "--device-map", "cuda", "-n", "16", "Hello"],
        "device_map_auto_bf16": ["--model", m, "--device-map", "auto", "--dtype", "bfloat16", "-n", "16", "Hello"],
        "float16": ["--model", m, "--device-map", "cuda", "--dtype", "float16", "-n", "16", "Hello"],
        "json_map": ["--model", m, "--device-map", '{"": 0}', "-n", "16", "Hello"],
        "4bit_nf4": ["--model", m, "--load-in-4bit", "--quant-type", "nf4", "--compute-dtype", "bfloat16", "-n", "16", "Hello"],
        "4bit_fp4": ["--model", m, "--load-in-4bit", "--quant-type", "fp4", "-n", "16", "Hello"],
        "8bit": ["--model", m, "--load-in-8bit", "-n", "16", "Hello"],
        "beam_cuda": ["--model", m, "--device-map", "cuda", "--num-beams", "4", "-n", "16", "Hello"],
        "sampling_cuda": ["--model", m, "--device-map", "cuda", "--preset", "creative", "--seed", "1", "-n", "16", "Hello"],
        "contrastive_cuda": ["--model", m, "--device-map", "cuda", "--preset", "contrastive", "-n", "16", "Hello"],
    })
    print(json.dumps(report["cli"]), flush=True)
    import genkit

    for dtype in ("float32", "bfloat16"):
        lm = genkit.load(m, device_map="cuda", dtype=dtype)
        report[f"parity_{dtype}"] = parity(lm)
        report[f"speed_{dtype}_b1"] = speed(lm, args.new_tokens)
        report[f"speed_{dtype}_b8"] = speed(lm, args.new_tokens, batch=8)
        print(json.dumps({k: v for k, v in report.items() if dtype in k}), flush=True)
        del lm
        torch.cuda.empty_cache()
    lm = genkit.load(m, load_in_4bit=True, quant_type="nf4", compute_dtype="bfloat16")
    report["parity_4bit_nf4"] = parity(lm)
    report["speed_4bit_nf4_b1"] = speed(lm, args.new_tokens)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

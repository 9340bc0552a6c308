"""Prove genkit's GPU paths on a CUDA machine (run by hand; CI has no GPU).

    python benchmarks/gpu_check.py MODEL_DIR_WITH_CONFIG_AND_TOKENIZER [--out results.json]

The directory needs a config.json and tokenizer files; when it has no weights, a model with
that architecture and random weights is created (the embedded model's 98 MB GGUF cannot travel
to the GPU machines lent here, and speed and parity do not depend on the weights' values).

It checks, on the GPU: `--device-map cuda` / `auto`, bfloat16 and float16, 4-bit (nf4, fp4) and
8-bit bitsandbytes loading, token-for-token greedy parity with transformers' generate() on the
same GPU, and prints batch-1 greedy tokens/s of genkit and of plain generate() side by side.
"""

from __future__ import annotations

import argparse
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


def cli(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "genkit", "run", "--json", *args], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-500:], "rc": r.returncode}
    rec = json.loads(r.stdout)
    return {"tokens": rec["usage"]["completion_tokens"], "tokens_per_s": rec["timings"]["tokens_per_s"]}


def speed(lm, n_new: int, runs: int = 3) -> dict:
    """Batch-1 greedy tokens/s: genkit's engine and plain generate(), alternating."""
    import genkit
    from genkit import prompts

    text = "Write a long story about a lighthouse keeper."
    ids, mask, _ = prompts.encode(lm, [text], templated=False, max_new_tokens=n_new)
    out = {"genkit": [], "transformers": []}
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        res = genkit.generate(lm, text, raw=True, max_new_tokens=n_new, suppress_tokens=[lm.tokenizer.eos_token_id])
        torch.cuda.synchronize()
        out["genkit"].append(len(res.results[0].token_ids) / (time.perf_counter() - t))
        t = time.perf_counter()
        with torch.inference_mode():
            g = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                                  suppress_tokens=[lm.tokenizer.eos_token_id], pad_token_id=lm.tokenizer.pad_token_id)
        torch.cuda.synchronize()
        out["transformers"].append((g.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    best = {k: round(max(v), 1) for k, v in out.items()}
    best["ratio"] = round(best["genkit"] / best["transformers"], 2)
    return best


def parity(lm) -> bool:
    import genkit
    from genkit import prompts

    texts = ["The capital of France is", "Once upon a time, in a land far away, there lived"]
    ours = genkit.generate(lm, texts, raw=True, max_new_tokens=24)
    ids, mask, _ = prompts.encode(lm, texts, templated=False, max_new_tokens=24)
    with torch.inference_mode():
        g = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                              pad_token_id=lm.tokenizer.pad_token_id)
    theirs = g[:, ids.shape[1]:].tolist()
    eos = lm.tokenizer.eos_token_id
    theirs = [r[: r.index(eos) + 1] if eos in r else r for r in theirs]
    return [r.token_ids for r in ours.results] == theirs


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
    report["cli"] = {
        "device_map_cuda": cli("--model", m, "--device-map", "cuda", "-n", "16", "Hello"),
        "device_map_auto_bf16": cli("--model", m, "--device-map", "auto", "--dtype", "bfloat16", "-n", "16", "Hello"),
        "float16": cli("--model", m, "--device-map", "cuda", "--dtype", "float16", "-n", "16", "Hello"),
        "json_map": cli("--model", m, "--device-map", '{"": 0}', "-n", "16", "Hello"),
        "4bit_nf4": cli("--model", m, "--load-in-4bit", "--quant-type", "nf4", "--compute-dtype", "bfloat16", "-n", "16", "Hello"),
        "4bit_fp4": cli("--model", m, "--load-in-4bit", "--quant-type", "fp4", "-n", "16", "Hello"),
        "8bit": cli("--model", m, "--load-in-8bit", "-n", "16", "Hello"),
        "beam_cuda": cli("--model", m, "--device-map", "cuda", "--num-beams", "4", "-n", "16", "Hello"),
        "sampling_cuda": cli("--model", m, "--device-map", "cuda", "--preset", "creative", "--seed", "1", "-n", "16", "Hello"),
    }
    import genkit

    for dtype in ("float32", "bfloat16"):
        lm = genkit.load(m, device_map="cuda", dtype=dtype)
        report[f"parity_{dtype}"] = parity(lm)
        report[f"speed_{dtype}"] = speed(lm, args.new_tokens)
        del lm
        torch.cuda.empty_cache()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

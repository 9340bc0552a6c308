"""genkit's native GGUF decoder against llama.cpp on the same files, at real model sizes.

Speed does not depend on the weights' values, so the larger models are written here as GGUF
files of their real shapes with random blocks, in llama.cpp's Q4_K_M and Q8_0 mixes:
Llama-3.2-1B (llama), Qwen2.5-1.5B (qwen2: q/k/v biases) and Qwen3-4B (qwen3: q/k norms).
`--real` adds files that exist as they are (the embedded SmolLM2-135M, Gemma 3 270M).

Each tool runs in its own process (its peak RSS is its own), both load the file once, and
rounds alternate between them (a noisy machine hurts both alike); the best round counts. A
round starts from an empty KV cache, feeds the same prompt ids, and makes `--new-tokens` greedy
tokens: prompt tokens/s is the prompt's length over the time to the first token, decode
tokens/s the other tokens over their time. Two prompts: 16 tokens (decode speed) and 256
tokens (prompt speed).

    python benchmarks/gguf_vs_llama_cpp.py --threads 2                  # every shape, both mixes
    python benchmarks/gguf_vs_llama_cpp.py --models llama-3.2-1b --mixes Q4_K_M --rounds 2
    python benchmarks/gguf_vs_llama_cpp.py --real gemma.gguf --models none

Needs llama-cpp-python (`pip install 'genkit[bench]'`). Files go to --dir (default
~/.cache/genkit-bench); a 4B Q8_0 file is 4.3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The shapes of the models people download (their config.json values).
SHAPES = {
    "llama-3.2-1b": dict(arch="llama", hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192,
                         vocab=128256, rope_theta=500000.0, eps=1e-5),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, ffn=8960,
                         vocab=151936, rope_theta=1000000.0, eps=1e-6),
    "qwen3-4b": dict(arch="qwen3", hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, ffn=9728,
                     vocab=151936, rope_theta=1000000.0, eps=1e-6),
}
MIXES = ("Q4_K_M", "Q8_0")
# fp16 scale fields of a block and a size that keeps weights around 0.02 (offsets into the block)
SCALES = {"Q4_K": ([0, 2], 1e-4), "Q6_K": ([208], 5e-5), "Q8_0": ([0], 2e-4)}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v / ffn_down Q4_K_M stores as Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, mix: str, layers: int) -> str:
    if mix == "Q8_0":
        return "Q8_0"
    if name == "token_embd.weight":  # tied: it is the output head too, which Q4_K_M keeps in Q6_K
        return "Q6_K"
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and _more_bits(int(name.split(".")[1]), layers):
        return "Q6_K"
    return "Q4_K"


def random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    import gguf

    per, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    blocks = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    fields, scale = SCALES[kind]
    for at in fields:
        d = rng.uniform(scale / 2, scale, blocks.shape[:2]).astype(np.float16)
        blocks[:, :, at:at + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def _tokenizer(writer, vocab: int) -> None:
    """A byte-level BPE tokenizer (llama.cpp's "gpt2" kind) padded with reserved tokens to the
    model's vocabulary size, so that both tools build it from the file."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte = bytes_to_unicode()
    tokens = ["<|pad|>", "<|begin|>", "<|end|>"] + [byte[b] for b in range(256)]
    merges = [f"Ġ {c}" for c in "etaoinsrhl"]
    tokens += [m.replace(" ", "") for m in merges]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    tokens += [f"<|reserved_{i}|>" for i in range(vocab - len(tokens))]
    types += [4] * (vocab - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)


def write_model(name: str, mix: str, path: Path, seed: int = 0) -> Path:
    """A GGUF file of `name`'s shape in `mix`, random blocks, written atomically."""
    import gguf

    s = SHAPES[name]
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[s["arch"]]
    tmp = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(s["layers"])
    writer.add_context_length(4096)
    writer.add_embedding_length(s["hidden"])
    writer.add_feed_forward_length(s["ffn"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_key_length(s["head_dim"])
    writer.add_value_length(s["head_dim"])
    writer.add_layer_norm_rms_eps(s["eps"])
    writer.add_rope_freq_base(s["rope_theta"])
    writer.add_vocab_size(s["vocab"])
    _tokenizer(writer, s["vocab"])
    rng = np.random.default_rng(seed)
    h, d, f = s["hidden"], s["head_dim"], s["ffn"]
    q, kv = s["heads"] * d, s["kv_heads"] * d

    def matrix(tensor: str, rows: int, cols: int) -> None:
        kind = tensor_type(tensor, mix, s["layers"])
        writer.add_tensor(tensor, random_blocks(kind, rows, cols, rng), raw_dtype=gguf.GGMLQuantizationType[kind])

    def vector(tensor: str, n: int, value: float = 1.0) -> None:
        writer.add_tensor(tensor, (value + 0.05 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", s["vocab"], h)
    vector("output_norm.weight", h)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", h)
        vector(p + "ffn_norm.weight", h)
        for part, rows in (("q", q), ("k", kv), ("v", kv)):
            matrix(p + f"attn_{part}.weight", rows, h)
            if s["arch"] == "qwen2":
                vector(p + f"attn_{part}.bias", rows, 0.0)
        if s["arch"] == "qwen3":
            vector(p + "attn_q_norm.weight", d)
            vector(p + "attn_k_norm.weight", d)
        matrix(p + "attn_output.weight", h, q)
        matrix(p + "ffn_gate.weight", f, h)
        matrix(p + "ffn_up.weight", f, h)
        matrix(p + "ffn_down.weight", h, f)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


# ---------------------------------------------------------------- the two workers


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LlamaCppWorker:
    def __init__(self, path: str, threads: int, int8: bool):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                         verbose=False, seed=0)

    def round(self, ids: list[int], new: int):
        self.llm.reset()
        out, first = [], None
        start = time.perf_counter()
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            if first is None:
                first = time.perf_counter()
            out.append(token)
            if len(out) == new:
                break
        return start, first, time.perf_counter(), out


class GenkitWorker:
    def __init__(self, path: str, threads: int, int8: bool):
        import torch

        from genkit import api

        self.torch = torch
        self.lm = api.load(path, threads=threads, int8_activations=int8)

    def round(self, ids: list[int], new: int):
        torch = self.torch
        with torch.inference_mode():
            start = time.perf_counter()
            prompt = torch.tensor([ids])
            runner = self.lm.backend.runner(prompt, torch.ones_like(prompt))
            token = runner.prefill().logits[:, -1].argmax(-1, keepdim=True)
            first = time.perf_counter()
            out = [int(token)]
            while len(out) < new:
                token = runner.step(token).logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(token))
        return start, first, time.perf_counter(), out


def worker(tool: str, path: str, threads: int, int8: bool) -> None:
    """Answer one JSON line per round read from stdin."""
    start = time.perf_counter()
    w = (LlamaCppWorker if tool == "llama.cpp" else GenkitWorker)(path, threads, int8)
    print(json.dumps({"load_s": time.perf_counter() - start, "rss_mb": _peak_rss_mb()}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        start, first, end, out = w.round(ask["ids"], ask["new"])
        print(json.dumps({"prompt_tps": len(ask["ids"]) / (first - start),
                          "decode_tps": (len(out) - 1) / (end - first), "ids": out,
                          "rss_mb": _peak_rss_mb()}), flush=True)


# ---------------------------------------------------------------- the side-by-side run


class Worker:
    def __init__(self, tool: str, path: Path, threads: int, int8: bool):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", tool, "--model", str(path),
                                      "--threads", str(threads)] + (["--int8-activations"] if int8 else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.loaded = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a worker stopped (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, ids: list[int], new: int) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids, "new": new}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare(path: Path, threads: int, rounds: int, new: int, int8: bool) -> dict:
    rng = np.random.default_rng(1)
    prompts = {n: [int(i) for i in rng.integers(3, 269, n)] for n in (16, 256)}
    tools = {"llama.cpp": Worker("llama.cpp", path, threads, int8), "genkit": Worker("genkit", path, threads, int8)}
    best = {t: {"prompt_tps_256": 0.0, "prompt_tps_16": 0.0, "decode_tps": 0.0} for t in tools}
    ids = {}
    for _ in range(rounds):
        for tool, w in tools.items():
            for n, ids_in in prompts.items():
                r = w.ask(ids_in, new)
                b = best[tool]
                b[f"prompt_tps_{n}"] = max(b[f"prompt_tps_{n}"], r["prompt_tps"])
                if n == 16:
                    b["decode_tps"] = max(b["decode_tps"], r["decode_tps"])
                    ids[tool] = r["ids"]
                b["rss_mb"] = r["rss_mb"]
    for tool, w in tools.items():
        best[tool]["load_s"] = w.loaded["load_s"]
        w.close()
    same = next((i for i, (a, b) in enumerate(zip(ids["genkit"], ids["llama.cpp"])) if a != b), new)
    g, l = best["genkit"], best["llama.cpp"]
    return {"file": path.name, "size_mb": round(path.stat().st_size / 2**20), "threads": threads,
            "genkit_int8_activations": int8,
            "genkit": {k: round(v, 2) for k, v in g.items()}, "llama.cpp": {k: round(v, 2) for k, v in l.items()},
            "decode_ratio": round(g["decode_tps"] / l["decode_tps"], 3),
            "prompt_ratio_256": round(g["prompt_tps_256"] / l["prompt_tps_256"], 3),
            "rss_over_llama_cpp_mb": round(g["rss_mb"] - l["rss_mb"]), "same_leading_tokens": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(SHAPES), help="comma-separated shapes, or 'none'")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--real", action="append", default=[], help="an existing .gguf to compare too")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--int8-activations", action="store_true", help="genkit with --int8-activations")
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "genkit-bench")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.threads, args.int8_activations)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install 'genkit[bench]'")
    files = [Path(p) for p in args.real]
    names = [] if args.models == "none" else args.models.split(",")
    for name in names:
        for mix in args.mixes.split(","):
            path = args.dir / f"{name}-random-{mix}.gguf"
            if not path.exists():
                args.dir.mkdir(parents=True, exist_ok=True)
                print(f"writing {path}", file=sys.stderr)
                write_model(name, mix, path)
            files.append(path)
    for path in files:
        print(json.dumps(compare(path, args.threads, args.rounds, args.new_tokens, args.int8_activations)), flush=True)


if __name__ == "__main__":
    main()

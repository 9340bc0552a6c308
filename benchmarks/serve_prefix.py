"""Time to first token of `genkit serve` for requests sharing a long system prompt, with the
prefix cache (--prefix-cache-mb, default 256) and without it (0), on 127.0.0.1 only.

    python benchmarks/serve_prefix.py                       # the embedded model, 8 requests
    python benchmarks/serve_prefix.py --requests 12 --system-words 600 --model DIR

Run by hand (not in CI). For each setting it starts `genkit serve --port 0`, sends the same
chat requests one after another (streamed, greedy, a few tokens each: the same long system
prompt, a different question each), and prints the prompt tokens, how many the server had to
prefill (GET /health) and the percentiles of the time to first token; then whether every answer
came out the same with and without the cache.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import httpx

from serve_load import percentiles, start_server

QUESTIONS = ["When is high tide?", "Is the evening ferry running?", "What is the weather for the boats?",
             "Which pier does the ferry leave from?", "Can I moor overnight?", "Where is the fuel dock?",
             "Who do I call in an emergency?", "How deep is the channel at low water?"]
PREAMBLE = ("You are the harbour master's assistant. Answer in full sentences, name the tides and the weather "
            "when they matter, never guess a ferry time you were not given, and keep answers short. ")


def ask(client: httpx.Client, url: str, model: str, system: str, question: str, max_tokens: int):
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first, text = None, []
    with client.stream("POST", f"{url}/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for c in json.loads(line[len("data: "):])["choices"]:
                if c["delta"].get("content") and first is None:
                    first = time.perf_counter()
                text.append(c["delta"].get("content") or "")
    return "".join(text), (first or time.perf_counter()) - start


def run(args, cache_mb: float, system: str) -> tuple[list[str], list[float], int]:
    args.extra = ["--prefix-cache-mb", str(cache_mb)]
    proc, url = start_server(args)
    try:
        root = url[: -len("/v1")]
        model = httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"]
        with httpx.Client(timeout=300) as client:
            ask(client, url, model, "Warm up.", "Hi", 2)
            before = httpx.get(f"{root}/health").json()["prefilled_tokens"]
            got = [ask(client, url, model, system, QUESTIONS[i % len(QUESTIONS)] + f" ({i})", args.max_tokens)
                   for i in range(args.requests)]
            fed = httpx.get(f"{root}/health").json()["prefilled_tokens"] - before
        return [t for t, _ in got], [s for _, s in got], fed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model for the servers it starts (default: the embedded model)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--system-words", type=int, default=400, help="about how long the shared system prompt is")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args()
    if not 2 <= args.requests <= 256:
        sys.exit("serve_prefix: --requests must be 2-256")
    words = PREAMBLE.split()
    system = " ".join(words[i % len(words)] for i in range(args.system_words))
    results = {}
    for label, mb in (("without the prefix cache", 0), ("with the prefix cache", 256)):
        texts, ttft, fed = run(args, mb, system)
        results[label] = texts
        print(f"{label}: {args.requests} requests, {fed} prompt tokens prefilled; first token "
              f"{percentiles(ttft)}, mean {sum(ttft) / len(ttft):.2f} s", flush=True)
    same = sum(a == b for a, b in zip(*results.values()))
    print(f"identical answers: {same}/{args.requests}")


if __name__ == "__main__":
    main()

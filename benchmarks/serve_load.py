"""A bounded load test of `genkit serve`: the same requests one after another, then from
several clients at once, on 127.0.0.1 only.

    python benchmarks/serve_load.py                        # the embedded model, 32 requests, 16 clients
    python benchmarks/serve_load.py --requests 16 --max-tokens 32 --model DIR

Run by hand (not in CI). It starts `genkit serve --port 0` on 127.0.0.1 (or uses --url, which
must point at this machine), sends a fixed number of streamed completion requests, greedy, each
forced to exactly --max-tokens tokens (min_new_tokens), first one at a time and then from
--clients threads at once, and prints for each phase the completion tokens/s, requests/s and
the percentiles of latency and time to first token, then the ratio of the two throughputs and
whether every text came out the same both ways. Target: 16 clients at least 5x one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

TOPICS = ["the sea", "a lighthouse", "bread", "winter", "a library", "the tides", "gulls", "a ferry",
          "the market", "a map", "the cliffs", "jellyfish", "a river", "the harbour", "coal", "a museum"]


@dataclass
class Outcome:
    text: str
    tokens: int
    latency_s: float
    ttft_s: float


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "min_new_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    first = None
    text, tokens = [], 0
    with client.stream("POST", f"{url}/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                if c["text"] and first is None:
                    first = time.perf_counter()
                text.append(c["text"])
    end = time.perf_counter()
    return Outcome("".join(text), tokens, end - start, (first or end) - start)


def run_phase(url: str, model: str, prompts: list[str], max_tokens: int, clients: int, deadline: float):
    outcomes: list[Outcome | None] = [None] * len(prompts)
    next_index = iter(range(len(prompts)))
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=300) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                outcomes[i] = one_request(client, url, model, prompts[i], max_tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if any(o is None for o in outcomes):
        sys.exit(f"serve_load: the phase with {clients} clients ran past --time-limit")
    return outcomes, elapsed


def percentiles(values: list[float]) -> str:
    qs = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {qs[49]:.2f} s, p90 {qs[89]:.2f} s, p99 {qs[98]:.2f} s"


def report(name: str, outcomes: list[Outcome], elapsed: float) -> float:
    tokens = sum(o.tokens for o in outcomes)
    tps = tokens / elapsed
    print(f"{name}: {len(outcomes)} requests, {tokens} tokens in {elapsed:.1f} s: {tps:.1f} tokens/s, "
          f"{len(outcomes) / elapsed:.2f} requests/s")
    print(f"  latency {percentiles([o.latency_s for o in outcomes])}")
    print(f"  first token {percentiles([o.ttft_s for o in outcomes])}")
    return tps


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "genkit", "serve", "--host", "127.0.0.1", "--port", "0",
           "--max-batch", str(args.max_batch)]
    if args.model:
        cmd += ["--model", args.model]
    cmd += getattr(args, "extra", [])  # more `genkit serve` flags (benchmarks/serve_prefix.py)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ})
    while True:
        line = proc.stderr.readline()
        if not line:
            sys.exit("serve_load: the server did not start")
        match = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
        if match:
            return proc, match.group(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model for the server it starts (default: the embedded model)")
    ap.add_argument("--url", help="a running server's /v1 address on this machine instead")
    ap.add_argument("--requests", type=int, default=32, help="requests per phase (fixed count)")
    ap.add_argument("--clients", type=int, default=16, help="clients at once in the second phase")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=900, help="seconds for the whole test")
    args = ap.parse_args()
    if not 1 <= args.requests <= 1024 or not 1 <= args.clients <= 64:
        sys.exit("serve_load: --requests must be 1-1024 and --clients 1-64")
    proc = None
    url = args.url
    if url:
        if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit("serve_load: --url must be on this machine (127.0.0.1)")
    else:
        proc, url = start_server(args)
    deadline = time.monotonic() + args.time_limit
    try:
        model = httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"]
        prompts = [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (note {i})." for i in range(args.requests)]
        one_request(httpx.Client(timeout=300), url, model, "Warm up.", 4)
        print(f"genkit serve load test: {model}, {args.requests} requests of {args.max_tokens} tokens, "
              f"greedy, {os.cpu_count()} CPUs, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
        alone, t_alone = run_phase(url, model, prompts, args.max_tokens, 1, deadline)
        tps_alone = report("one at a time", alone, t_alone)
        together, t_together = run_phase(url, model, prompts, args.max_tokens, args.clients, deadline)
        tps_together = report(f"{args.clients} clients", together, t_together)
        same = sum(a.text == b.text for a, b in zip(alone, together))
        print(f"{args.clients} clients / one at a time: {tps_together / tps_alone:.2f}x; "
              f"identical texts: {same}/{len(prompts)}")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()

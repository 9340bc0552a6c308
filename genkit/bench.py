"""`genkit bench`: genkit's engine against plain transformers generate(), side by side, one process.

Each scenario runs both on the same model, prompts and settings, alternating (so a noisy
machine hurts both alike), keeps the best of the rounds, and reports tokens/s, time to first
token, memory and the genkit/transformers ratio. Greedy scenarios also report whether both
produced the same token ids. Strategies transformers 5 no longer implements (DoLa, contrastive
search) are reported as the cost of their step relative to genkit's own greedy step, and prompt
lookup also as a speed-up over it; that greedy run uses the scenario's prompts and alternates
with it in the same rounds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

STORY = "Write a long story about a lighthouse keeper who finds a message in a bottle."
# An input-grounded task: the answer copies long spans of the prompt, which prompt lookup drafts.
GROUNDED = (
    "Rewrite the following text, keeping every sentence but fixing the spelling mistakes:\n\n"
    "The lighthouse stood on the edge of the cliff for more then two hundred years. Every night "
    "the keeper climbed the hundred and twelve steps to light the lamp, and every morning he "
    "wrote the weather in a thick leather book. Ships passing the rocks saw the light and knew "
    "they were safe. One winter a storm broke the windows and the keeper had to hold the lamp "
    "with his own hands untill dawn."
)


@dataclass
class Scenario:
    name: str
    prompts: list[str]
    params: dict
    transformers: bool = True  # does plain generate() implement it?
    raw: bool = False
    # Also run genkit's greedy on the same prompts in the same rounds, and say how this compares:
    # "step" (cost of a step: DoLa, contrastive) or "speed" (tokens/s: prompt lookup).
    versus_greedy: str | None = None


@dataclass
class Row:
    scenario: str
    genkit_tps: float
    transformers_tps: float | None = None
    genkit_ttft: float | None = None
    transformers_ttft: float | None = None
    memory_mb: float | None = None
    same_tokens: bool | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if not self.transformers_tps:
            return None
        return self.genkit_tps / self.transformers_tps


def scenarios(new_tokens: int, with_assistant: bool, only: list[str] | None = None) -> list[Scenario]:
    greedy = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    items = [
        Scenario("greedy-b1", [STORY], greedy),
        Scenario("sampling-b1", [STORY], {**greedy, "do_sample": True, "temperature": 0.8, "top_p": 0.95, "seed": 1}),
        Scenario("greedy-b8", [f"{STORY} Chapter {i}." * (1 + i % 3) for i in range(8)], greedy),
        Scenario("beam4", [STORY], {**greedy, "num_beams": 4}),
        Scenario("prompt-lookup", [GROUNDED], {"do_sample": False, "max_new_tokens": new_tokens,
                                               "prompt_lookup_num_tokens": 10}, versus_greedy="speed"),
        Scenario("dola", [STORY], {**greedy, "dola_layers": "high", "repetition_penalty": 1.2}, transformers=False,
                 versus_greedy="step"),
        Scenario("contrastive", [STORY], {**greedy, "penalty_alpha": 0.6, "top_k": 4}, transformers=False,
                 versus_greedy="step"),
    ]
    if with_assistant:
        items.insert(5, Scenario("assisted", [GROUNDED], {"do_sample": False, "max_new_tokens": new_tokens}))
    if only:
        items = [s for s in items if s.name in only]
    return items


SCENARIOS = ("greedy-b1", "sampling-b1", "greedy-b8", "beam4", "prompt-lookup", "assisted", "dola", "contrastive")


def check_names(names: list[str], with_assistant: bool) -> None:
    """Reject an unknown --only scenario before any model loads."""
    from genkit.errors import GenkitError, did_you_mean

    for n in names:
        if n not in SCENARIOS:
            raise GenkitError(f"--only {n}: unknown scenario{did_you_mean(n, SCENARIOS)}; choose from {', '.join(SCENARIOS)}")
        if n == "assisted" and not with_assistant:
            raise GenkitError("--only assisted needs --assistant-model (a draft model with the same tokenizer)")


def _memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return float("nan")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FirstToken:
    """A put()/end() streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.calls = 0
        self.first: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first put() is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def run_transformers(lm, sc: Scenario, assistant=None):
    from genkit import prompts

    templated = prompts.uses_chat(lm, sc.raw)
    texts = [prompts.to_text(lm, p, raw=sc.raw) for p in sc.prompts]
    ids, mask, _ = prompts.encode(lm, texts, templated=templated, max_new_tokens=0)
    kw = {k: v for k, v in sc.params.items() if k != "seed"}
    if "seed" in sc.params:
        torch.manual_seed(sc.params["seed"])
    stream = _FirstToken() if len(texts) == 1 and kw.get("num_beams", 1) == 1 else None
    if assistant is not None:
        kw["assistant_model"] = assistant.model
    _sync(lm.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=lm.tokenizer.pad_token_id,
                                streamer=stream, **kw)
    _sync(lm.device)
    elapsed = time.perf_counter() - start
    new = out[:, ids.shape[1]:]
    tokens = int((new != lm.tokenizer.pad_token_id).sum()) if len(texts) > 1 else new.shape[1]
    ttft = (stream.first - start) if stream is not None and stream.first else None
    return tokens / elapsed, ttft, new.tolist()


def run_genkit(lm, sc: Scenario, assistant=None):
    from genkit import api

    _sync(lm.device)
    start = time.perf_counter()
    gen = api.stream(lm, list(sc.prompts), raw=sc.raw, assistant=assistant, **sc.params)
    gen.run()
    _sync(lm.device)
    elapsed = time.perf_counter() - start
    tokens = gen.stats.completion_tokens
    return tokens / elapsed, gen.stats.time_to_first_token_s, [r.token_ids for r in gen.results]


def _same(ours: list[list[int]], theirs: list[list[int]], eos: int | None) -> bool:
    def cut(row):
        return row[: row.index(eos) + 1] if eos is not None and eos in row else row

    return [cut(r) for r in ours] == [cut(r) for r in theirs]


# Where the reference's logits for its own token and for genkit's differ by less than this share
# of their largest magnitude, the two runs parted at a near tie: rounding (quantised weights or
# activations, another summation order) is enough to swap them.
NEAR_TIE = 0.01


def first_difference(ref, sc: Scenario, ours: list[list[int]], theirs: list[list[int]]) -> str:
    """Where two greedy runs first part, and whether the reference model saw a near tie there:
    its logits for its own token and for genkit's, one forward pass over the shared prefix."""
    for row, (a, b) in enumerate(zip(ours, theirs)):
        k = common_prefix(a, b)
        if k < min(len(a), len(b)):
            break
    else:
        return "lengths differ"
    from genkit import prompts

    text = prompts.to_text(ref, sc.prompts[row], raw=sc.raw)
    ids, _, _ = prompts.encode(ref, [text], templated=prompts.uses_chat(ref, sc.raw), max_new_tokens=0)
    with torch.inference_mode():
        logits = ref.model(torch.cat([ids, torch.tensor([b[:k]], dtype=ids.dtype)], 1).to(ref.device)).logits[0, -1]
    gap = float(logits[b[k]] - logits[a[k]])
    tie = "a near tie" if gap <= NEAR_TIE * float(logits.abs().max()) else "not a near tie"
    return f"parts at token {k + 1}: {tie} (reference logits {float(logits[b[k]]):.3f} vs {float(logits[a[k]]):.3f})"


def _plain_greedy(sc: Scenario) -> Scenario | None:
    """The greedy run a scenario is compared with: same prompts, no strategy of its own."""
    if not sc.versus_greedy:
        return None
    params = {k: v for k, v in sc.params.items()
              if k not in ("prompt_lookup_num_tokens", "dola_layers", "repetition_penalty", "penalty_alpha", "top_k")}
    return Scenario(f"{sc.name}-greedy", sc.prompts, params, raw=sc.raw)


def bench(lm, *, new_tokens=64, rounds=3, assistant=None, only=None, reference=None, progress=None) -> list[Row]:
    """Run every scenario; `reference` is the model plain transformers runs (default: `lm`),
    which lets the native 4-bit mode be compared with the fp32 path."""
    ref = reference or lm
    rows = []
    for sc in scenarios(new_tokens, assistant is not None, only):
        if progress:
            progress(sc.name)
        ours, theirs, greedy_runs = [], [], []
        greedy = _plain_greedy(sc)
        for _ in range(rounds):
            if sc.transformers:
                theirs.append(run_transformers(ref, sc, assistant))
            if greedy:
                greedy_runs.append(run_genkit(lm, greedy)[0])
            ours.append(run_genkit(lm, sc, assistant))
        best = max(ours, key=lambda r: r[0])
        row = Row(sc.name, genkit_tps=best[0], genkit_ttft=min((r[1] for r in ours if r[1] is not None), default=None),
                  memory_mb=_memory_mb(lm.device))
        if theirs:
            tb = max(theirs, key=lambda r: r[0])
            row.transformers_tps = tb[0]
            row.transformers_ttft = min((r[1] for r in theirs if r[1] is not None), default=None)
            if not sc.params.get("do_sample"):
                row.same_tokens = _same(best[2], tb[2], lm.tokenizer.eos_token_id)
                if not row.same_tokens and sc.params.get("num_beams", 1) == 1:
                    row.note = first_difference(ref, sc, best[2], tb[2])
        if greedy_runs and sc.versus_greedy == "step":
            cost = max(greedy_runs) / row.genkit_tps
            row.note = "; ".join(filter(None, [f"step {cost:.2f}x greedy", row.note]))
            row.extra["step_cost_vs_greedy"] = round(cost, 3)
        elif greedy_runs:
            speedup = row.genkit_tps / max(greedy_runs)
            row.note = "; ".join(filter(None, [f"{speedup:.2f}x genkit greedy", row.note]))
            row.extra["speedup_vs_greedy"] = round(speedup, 3)
        rows.append(row)
    return rows


def prompt_ids(lm, text: str) -> list[int]:
    """The token ids genkit's engine starts from for one prompt (chat template applied)."""
    from genkit import prompts

    ids, _, _ = prompts.encode(lm, [prompts.to_text(lm, text)], templated=prompts.uses_chat(lm, False),
                               max_new_tokens=0)
    return ids[0].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class VersusLlamaCpp:
    """Batch-1 greedy on the same GGUF file: llama.cpp and genkit, best of alternating rounds."""
    llama_tps: float
    llama_ttft: float
    genkit_tps: float
    genkit_ttft: float
    new_tokens: int
    same_leading_tokens: int  # how long the two greedy outputs agree

    @property
    def ratio(self) -> float:
        return self.genkit_tps / self.llama_tps


def versus_llama_cpp(lm, gguf_path: str, *, new_tokens: int = 64, rounds: int = 3) -> VersusLlamaCpp | None:
    """Alternate llama.cpp (llama-cpp-python) and genkit rounds of greedy-b1 on the same prompt ids.

    llama.cpp gets genkit's exact prompt ids (chat template applied), always makes `new_tokens`
    tokens as genkit's min_new_tokens run does, and starts each round from an empty cache:
    llama-cpp-python would otherwise reuse the last round's prompt and skip the prefill genkit
    pays for. None when llama-cpp-python is not installed.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    threads = torch.get_num_threads()
    llm = Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                verbose=False, seed=0)
    ours = scenarios(new_tokens, False, only=["greedy-b1"])[0]
    ids = prompt_ids(lm, ours.prompts[0])
    llama_tps, llama_ttft, genkit_tps, genkit_ttft = 0.0, float("inf"), 0.0, float("inf")
    for _ in range(rounds):
        llm.reset()
        theirs: list[int] = []
        start = time.perf_counter()
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            if not theirs:
                llama_ttft = min(llama_ttft, time.perf_counter() - start)
            theirs.append(token)
            if len(theirs) == new_tokens:
                break
        llama_tps = max(llama_tps, len(theirs) / (time.perf_counter() - start))
        tps, ttft, genkit_ids = run_genkit(lm, ours)
        genkit_tps, genkit_ttft = max(genkit_tps, tps), min(genkit_ttft, ttft)
    return VersusLlamaCpp(llama_tps, llama_ttft, genkit_tps, genkit_ttft, len(theirs),
                          common_prefix(genkit_ids[0], theirs))

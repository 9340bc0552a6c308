"""Every decoding strategy on the native GGUF path, against the dequantised transformers path.

Tiny random Llama and Gemma 3 models are written as GGUF files with a tokenizer in their
metadata (tests/gguf_writer.py) plus a one-layer draft model of each. The same file is loaded
twice: natively (genkit's decoder over the file's blocks, the default on the CPU) and with
`dequantize=True, backend="transformers"` (the fp32 copy through transformers' own forward, not
genkit's fp32 decoder). Both read the same weights, so the deterministic strategies
give the same token ids, and seeded sampling and the watermark, which draw from the same
per-row generators, the same tokens. (No near-tie separates the paths on these prompts; should
one appear, the logits test of test_gguf_native.py bounds the difference.)
"""

from __future__ import annotations

import pytest

import gguf_writer

pytestmark = pytest.mark.usefixtures("needs_kernels")

ARCHS = {"llama": ("llama", {}, "gpt2"), "gemma3": ("gemma3_text", {"num_hidden_layers": 6}, "llama")}
# Longer than Gemma's sliding window of 8, padded against each other, and repetitive enough
# that prompt lookup finds its n-grams.
PROMPTS = ["the cat sat on the mat and the cat sat on the", "hello there"]
CASES = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, do_sample=False),
    "diverse-beam": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, do_sample=False),
    "contrastive": dict(penalty_alpha=0.6, top_k=4, do_sample=False),
    "dola": dict(dola_layers="high", do_sample=False, repetition_penalty=1.2),
    "prompt-lookup": dict(prompt_lookup_num_tokens=3, do_sample=False),
    "assisted": dict(assistant_model="draft", num_assistant_tokens=3, do_sample=False),
    "assisted-sampling": dict(assistant_model="draft", num_assistant_tokens=3, do_sample=True, seed=5),
    "sampling": dict(do_sample=True, seed=7, temperature=0.9, top_k=50, num_return_sequences=2),
    "watermark": dict(do_sample=True, seed=7, watermark={"bias": 2.0}),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_files(request, tmp_path_factory):
    """(model file, draft file) of one architecture."""
    model_type, overrides, tokenizer = ARCHS[request.param]
    folder = tmp_path_factory.mktemp(f"native-{request.param}")
    model = gguf_writer.random_model(gguf_writer.tiny_config(model_type, **overrides))
    draft = gguf_writer.random_model(gguf_writer.tiny_config(model_type, **{**overrides, "num_hidden_layers": 1}), 1)
    return (gguf_writer.write(model, folder / "model.gguf", "Q8_0", tokenizer=tokenizer),
            gguf_writer.write(draft, folder / "draft.gguf", "Q8_0", tokenizer=tokenizer))


@pytest.fixture(scope="module")
def loaded(arch_files, genkit_home):
    """{"native" | "dequantized": (model, draft)} as genkit loads them."""
    from genkit import models

    def both(opts):
        return tuple(models.load(str(path), opts) for path in arch_files)

    return {"native": both(models.LoadOptions()),
            "dequantized": both(models.LoadOptions(dequantize=True, backend="transformers"))}


def _run(pair, **params):
    from genkit import api

    lm, draft = pair
    extra = {"assistant": draft} if "assistant_model" in params else {}
    gen = api.stream(lm, list(PROMPTS), raw=True, max_new_tokens=10, **params, **extra)
    events = [(ev.index, ev.text) for ev in gen if ev.token_ids]
    return [r.token_ids for r in gen.results], [r.finish_reason for r in gen.results], events


def test_the_two_paths_load_what_they_claim(loaded):
    native, dequantized = loaded["native"][0], loaded["dequantized"][0]
    assert native.info["mode"] == "gguf-native" and type(native.model).__name__ == "GGUFDecoder"
    assert type(dequantized.model).__name__.endswith("ForCausalLM") and dequantized.backend.kind == "transformers"
    text = "the cat sat on the mat. Ça!"
    assert native.tokenizer(text).input_ids == dequantized.tokenizer(text).input_ids


@pytest.mark.parametrize("case", sorted(CASES))
def test_strategy_equals_the_dequantized_path(loaded, case):
    native = _run(loaded["native"], **CASES[case])
    assert native == _run(loaded["dequantized"], **CASES[case])
    assert all(len(ids) > 0 for ids in native[0])


def test_stop_strings_and_streaming_equal_the_dequantized_path(loaded):
    """A stop string taken from the greedy output itself, so that it is met: the same cut text,
    the same finish reason, the same streamed pieces."""
    lm = loaded["native"][0]
    ids, _, _ = _run(loaded["native"], do_sample=False)
    stop = lm.tokenizer.decode(ids[0][3:5])
    native = _run(loaded["native"], do_sample=False, stop_strings=[stop])
    assert native == _run(loaded["dequantized"], do_sample=False, stop_strings=[stop])
    assert native[1][0] == "stop"


@pytest.mark.parametrize("params", [{}, {"do_sample": True, "temperature": 0.8, "num_return_sequences": 2}])
def test_continuous_batching_equals_each_prompt_alone(loaded, params):
    """Rows join and leave a running native batch (three at a time, different lengths and
    budgets); each job's tokens equal the dequantised path run on its prompt alone."""
    from genkit import api
    from genkit.engine import continuous

    lm, reference = loaded["native"][0], loaded["dequantized"][0]
    texts = ["hello", "the cat sat on the mat", "a", "once upon a time in a land far away there", "no", "the ant"]
    _, s = api.settings_for(lm, max_new_tokens=8, **params)
    assert continuous.supported(lm, s)
    jobs = [continuous.Job(i, lm.tokenizer(t)["input_ids"], 100 + i, 3 + 2 * (i % 3)) for i, t in enumerate(texts)]
    jobs.sort(key=lambda j: len(j.input_ids))
    got = {r.handle: [q.token_ids for q in r.sequences]
           for r in continuous.ContinuousBatcher(lm, s, batch_size=3, max_batch_tokens=60).run(jobs)}
    for job in jobs:
        alone = api.generate(reference, texts[job.handle], raw=True, max_new_tokens=job.max_new_tokens,
                             seed=job.seed, **params)
        assert got[job.handle] == [r.token_ids for r in alone.results], texts[job.handle]


def test_prefix_cache_on_the_native_decoder(loaded):
    """genkit serve's prefix cache over a native model's continuous batch (Gemma's sliding
    windows included): prompts that share beginnings of different lengths give the tokens a full
    prefill gives, and most of their positions come from the cache."""
    from genkit.engine.continuous import ContinuousBatcher, Job
    from genkit.engine.prefixes import PrefixCache
    from genkit.engine.settings import build

    lm = loaded["native"][0]
    s = build(lm, {"max_new_tokens": 5, "do_sample": False})
    base = lm.tokenizer("the cat sat on the mat and the dog sat on the log " * 2)["input_ids"]
    prompts = [base + lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("one", "two more", "x")]
    prompts += [base[:12], lm.tokenizer("nothing alike")["input_ids"]]

    def run(keep: bool):
        b = ContinuousBatcher(lm, s, batch_size=4)
        b.prefixes = PrefixCache(16 * 2**20) if keep else None
        first = [r.sequences[0].token_ids for r in b.run([Job(0, prompts[0], 0, 5)])]
        rest = {r.handle: r.sequences[0].token_ids for r in b.run([Job(i, p, 0, 5) for i, p in enumerate(prompts[1:], 1)])}
        return first + [rest[i] for i in range(1, len(prompts))], b.prefilled_tokens

    (plain, fed_plain), (reused, fed_reused) = run(False), run(True)
    assert reused == plain
    assert fed_reused < fed_plain * 2 / 3

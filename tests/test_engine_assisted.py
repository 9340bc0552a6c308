"""Assisted (speculative) and prompt-lookup decoding against transformers' generate(), token for
token, plus the statistical property that speculative sampling keeps the target's distribution."""

from __future__ import annotations

import copy
import math
from collections import Counter


import pytest
import torch

from conftest import _save_tiny, tiny_llama_config
from helpers import genkit_generate, hf_generate, on_backend
from genkit import api
from genkit.engine.strategies.assisted import lookup_draft
from genkit.errors import GenkitError
from genkit.models import LoadedModel, fix_tokenizer

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models do thousands of small forwards: on a shared CPU, torch's thread pool spends
    more time synchronising than computing (about 10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assistant_dir(tmp_path_factory, embedded_dir):
    """A smaller random Llama with the same tokenizer: its drafts are almost always rejected."""
    cfg = tiny_llama_config(num_hidden_layers=1)
    return _save_tiny(tmp_path_factory.mktemp("tiny-assistant"), cfg, embedded_dir, seed=1)


@pytest.fixture(scope="module")
def assistant(assistant_dir):
    from genkit import models

    return models.load(str(assistant_dir))


def perturbed(lm, std: float, seed: int = 0) -> LoadedModel:
    """A copy of `lm` with noise on every weight: it agrees with `lm` often, not always."""
    model = copy.deepcopy(lm.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return LoadedModel(model=model, tokenizer=lm.tokenizer, name=f"{lm.name}+noise", source="test", path="")


def hf_assisted(lm, draft: LoadedModel, prompts, k: int, **kwargs):
    """transformers' assisted generate(), one prompt at a time (it supports batch size 1 only),
    drafting exactly k tokens per step as genkit does (no confidence threshold)."""
    gc = draft.model.generation_config
    gc.num_assistant_tokens, gc.assistant_confidence_threshold = k, 0.0
    gc.num_assistant_tokens_schedule = "constant"
    return [hf_generate(lm, [p], do_sample=False, assistant_model=draft.model, **kwargs)[0] for p in prompts]


class ForwardCounter:
    """Counts the forward passes of a model (each Runner step is one). Counting needs
    transformers' forward: generate with `.lm`, the same model on that backend."""

    def __init__(self, lm):
        self.calls = 0
        self.lm = on_backend(lm, "transformers")
        self.handle = lm.model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------- assisted greedy


@pytest.mark.parametrize("params", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
def test_assisted_greedy_matches_transformers_tiny(tiny, assistant, params):
    ours = genkit_generate(tiny, PROMPTS, max_new_tokens=16, assistant=assistant,
                           assistant_model="tiny-assistant", num_assistant_tokens=4, **params)
    theirs = hf_assisted(tiny, assistant, PROMPTS, 4, max_new_tokens=16, **params)
    assert ours == theirs
    assert ours == genkit_generate(tiny, PROMPTS, max_new_tokens=16, **params)


def test_assisted_greedy_partial_acceptance(tiny):
    """A draft model that agrees with the target only sometimes: accepted prefixes of every
    length, rolled back caches on both sides, and still exactly the target's greedy text."""
    draft = perturbed(tiny, 0.004)
    with ForwardCounter(tiny) as target_calls:
        ours = genkit_generate(target_calls.lm, PROMPTS, max_new_tokens=24, assistant=draft,
                               assistant_model="noisy", num_assistant_tokens=3)
    assert ours == hf_assisted(tiny, draft, PROMPTS, 3, max_new_tokens=24)
    assert ours == genkit_generate(tiny, PROMPTS, max_new_tokens=24)
    tokens = sum(len(r) for r in ours)
    # some drafts were accepted (fewer target forwards than tokens), not all of them
    assert len(PROMPTS) < target_calls.calls < tokens


def test_heuristic_schedule_grows_the_draft(tiny):
    """With a draft model that is always right, the heuristic schedule drafts more per step
    (+2 after each fully accepted draft), so the target runs fewer times than with a constant
    draft length; the text is the same."""
    draft = LoadedModel(model=copy.deepcopy(tiny.model), tokenizer=tiny.tokenizer, name="copy",
                        source="test", path="")
    calls = {}
    texts = {}
    for schedule in ("constant", "heuristic"):
        with ForwardCounter(tiny) as counter:
            texts[schedule] = genkit_generate(
                counter.lm, PROMPTS[:1], max_new_tokens=40, assistant=draft, assistant_model="copy",
                num_assistant_tokens=2, num_assistant_tokens_schedule=schedule)
        calls[schedule] = counter.calls
    assert texts["constant"] == texts["heuristic"] == genkit_generate(tiny, PROMPTS[:1], max_new_tokens=40)
    # constant: 1 prefill + 39 tokens in steps of 3 = 14 forwards; heuristic: 3, 5, 7, 9, 11, ...
    assert calls["constant"] == 14
    assert calls["heuristic"] < 8


def test_assisted_greedy_embedded_target(embedded, assistant):
    """The real model as target, a tiny random draft model with the same tokenizer."""
    prompts = ["What is the capital of France?"]
    ours = genkit_generate(embedded, prompts, raw=False, max_new_tokens=12, assistant=assistant,
                           assistant_model="tiny-assistant", num_assistant_tokens=3)
    theirs = [hf_generate(embedded, prompts, raw=False, max_new_tokens=12, do_sample=False,
                          assistant_model=assistant.model)[0]]
    assert ours == theirs


def test_assistant_loaded_from_settings(tiny, assistant_dir):
    """`assistant_model` names a model that api.stream loads (the CLI's --assistant-model)."""
    ours = genkit_generate(tiny, PROMPTS[:1], max_new_tokens=8, assistant_model=str(assistant_dir))
    assert ours == genkit_generate(tiny, PROMPTS[:1], max_new_tokens=8)


def test_draft_loaded_once_per_target(tiny_dir, assistant_dir):
    """Every path that builds a Generation (API, run, compare, batch, chat) gets the draft the
    settings name from the target model, loaded once, in the target's dtype."""
    from genkit import models

    lm = models.load(str(tiny_dir))
    first = api.generate(lm, PROMPTS[:1], raw=True, max_new_tokens=6, assistant_model=str(assistant_dir))
    draft = lm.drafts[str(assistant_dir)]
    api.generate(lm, PROMPTS[:1], raw=True, max_new_tokens=6, assistant_model=str(assistant_dir))
    assert lm.drafts == {str(assistant_dir): draft}  # not loaded again
    assert draft.model.dtype == lm.model.dtype
    assert first.results[0].token_ids == api.generate(lm, PROMPTS[:1], raw=True, max_new_tokens=6).results[0].token_ids


def test_cli_commands_load_the_draft(tiny_dir, assistant_dir, tmp_path):
    """`genkit compare` had no draft to give assisted decoding; run, compare and batch now all
    get it from the settings, and give greedy's text."""
    import json

    from conftest import run_cli

    common = ["--model", str(tiny_dir), "--raw", "-n", "6"]
    greedy = run_cli("run", *common, "--greedy", "--json", PROMPTS[0])
    assert greedy.returncode == 0, greedy.stderr
    want = json.loads(greedy.stdout)["text"]
    run = run_cli("run", *common, "--greedy", "--json", "--assistant-model", str(assistant_dir), PROMPTS[0])
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["text"] == want
    compare = run_cli("compare", *common, "--json", "--variant", f"do_sample=false,assistant_model={assistant_dir}",
                      PROMPTS[0])
    assert compare.returncode == 0, compare.stderr
    assert [json.loads(line)["text"] for line in compare.stdout.splitlines()] == [want]
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": PROMPTS[0], "params": {
        "do_sample": False, "assistant_model": str(assistant_dir)}}) + "\n")
    batch = run_cli("batch", *common, str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"))
    assert batch.returncode == 0, batch.stderr
    assert json.loads((tmp_path / "out.jsonl").read_text())["text"] == want


def test_assisted_stops_and_logprobs_like_greedy(tiny, assistant):
    plain = api.generate(tiny, PROMPTS, raw=True, max_new_tokens=20, logprobs=True)
    text = plain.results[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    ours = api.generate(tiny, PROMPTS, raw=True, max_new_tokens=20, logprobs=True, assistant=assistant,
                        assistant_model="tiny-assistant", num_assistant_tokens=5)
    for a, b in zip(ours.results, plain.results):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    stopped = api.generate(tiny, PROMPTS[:1], raw=True, max_new_tokens=20, stop_strings=[stop],
                           assistant=assistant, assistant_model="tiny-assistant")
    assert stopped.results[0].finish_reason == "stop"
    assert stopped.results[0].text == text[: text.index(stop)]


# ---------------------------------------------------------------- bad parameters


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory, embedded_dir):
    cfg = tiny_llama_config(vocab_size=49160)
    return _save_tiny(tmp_path_factory.mktemp("other-vocab"), cfg, embedded_dir, seed=2)


def test_assistant_with_another_vocabulary_is_refused(tiny, other_vocab_dir):
    from genkit import models

    draft = models.load(str(other_vocab_dir))
    with pytest.raises(GenkitError) as err:
        genkit_generate(tiny, PROMPTS, max_new_tokens=4, assistant=draft, assistant_model="other")
    message = str(err.value)
    assert "different vocabularies" in message and "49160" in message and "\n" not in message


def test_assistant_with_another_vocabulary_cli(tiny_dir, other_vocab_dir, capsys):
    from genkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", str(tiny_dir), "--assistant-model", str(other_vocab_dir), "--raw", "-n", "4", "Hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.count("\n") == 1 and "different vocabularies" in err and "Traceback" not in err


def test_lookup_refuses_encoder_decoder(tiny_t5_dir):
    from genkit import models

    t5 = models.load(str(tiny_t5_dir))
    with pytest.raises(GenkitError, match="decoder-only"):
        genkit_generate(t5, PROMPTS, max_new_tokens=4, prompt_lookup_num_tokens=3)


# ---------------------------------------------------------------- prompt lookup


def test_lookup_draft_takes_the_latest_longest_match():
    seq = [1, 2, 3, 9, 1, 2, 4, 5, 7, 1, 2]
    assert lookup_draft(seq, 3, 2) == [4, 5, 7]  # "1 2" last seen before "4 5 7"
    assert lookup_draft(seq, 1, 2) == [4]
    assert lookup_draft([5, 6, 7, 8, 6], 2, 2) == [7, 8]  # no 2-gram match, the 1-gram "6" matches
    assert lookup_draft([1, 2, 3], 4, 2) == []
    assert lookup_draft([4, 4, 4], 5, 2) == [4]  # the overlapping match continues the run


REPEATING = [
    "red green blue red green blue red green blue red green",
    "one two three four five six seven eight nine ten one two three four five six seven",
]


@pytest.mark.parametrize("ngram", [None, 3])
def test_prompt_lookup_matches_transformers_tiny(tiny, ngram):
    params = {"prompt_lookup_num_tokens": 4, "max_matching_ngram_size": ngram}
    params = {k: v for k, v in params.items() if v is not None}
    ours = genkit_generate(tiny, REPEATING, max_new_tokens=20, **params)
    theirs = [hf_generate(tiny, [p], max_new_tokens=20, do_sample=False, **params)[0] for p in REPEATING]
    assert ours == theirs
    assert ours == genkit_generate(tiny, REPEATING, max_new_tokens=20)


@pytest.mark.slow
def test_prompt_lookup_embedded_input_grounded(embedded):
    """The docs' use case: the answer copies the prompt's text, so drafts are accepted and the
    target runs far fewer times than it generates tokens; the tokens are greedy's."""
    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump!")
    prompts = [f"Repeat this text exactly, word for word: {text}"]
    with ForwardCounter(embedded) as counter:
        ours = genkit_generate(counter.lm, prompts, raw=False, max_new_tokens=40, prompt_lookup_num_tokens=10)
    theirs = hf_generate(embedded, prompts, raw=False, max_new_tokens=40, do_sample=False,
                         prompt_lookup_num_tokens=10)
    assert ours == theirs
    assert "quick brown fox" in embedded.tokenizer.decode(ours[0])
    assert counter.calls < len(ours[0]) / 2


def test_prompt_lookup_sampling_equals_plain_sampling(tiny):
    """Lookup sampling draws each position from the target as plain sampling does, with the
    same generator, so a seed gives the very same tokens."""
    for seed in (1, 2, 3):
        plain = genkit_generate(tiny, REPEATING[:1], do_sample=True, seed=seed, max_new_tokens=16, top_k=5)
        lookup = genkit_generate(tiny, REPEATING[:1], do_sample=True, seed=seed, max_new_tokens=16, top_k=5,
                                 prompt_lookup_num_tokens=4)
        assert lookup == plain


# ---------------------------------------------------------------- assisted sampling


def word_model(seed: int) -> LoadedModel:
    """A one-layer Llama over four words with large random weights: peaked distributions that
    differ from seed to seed, and a forward pass cheap enough to sample thousands of times."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "a": 2, "b": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        initializer_range=0.3, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    fix_tokenizer(tok, model)
    return LoadedModel(model=model, tokenizer=tok, name=f"words-{seed}", source="test", path="")


def next_token_probs(lm, ids: list[int], eos: int) -> list[float]:
    """The model's next-token distribution after `ids`, with eos forbidden (min_new_tokens)."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, -1]
    logits[eos] = -math.inf
    return torch.softmax(logits, -1).tolist()


def exact_distribution(lm, prompt_ids: list[int], length: int, eos: int) -> dict[tuple, float]:
    """P(first `length` tokens) by enumerating every prefix: the law speculative sampling must
    reproduce."""
    out = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, prob in out.items():
            for token, p in enumerate(next_token_probs(lm, prompt_ids + list(prefix), eos)):
                if p > 0:
                    grown[prefix + (token,)] = prob * p
        out = grown
    return out


def chi_square(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic with cells of expected count under 5 pooled; (statistic, dof)."""
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for key, p in probs.items():
        if n * p >= 5:
            cells.append((counts.get(key, 0), n * p))
        else:
            pooled_obs, pooled_exp = pooled_obs + counts.get(key, 0), pooled_exp + n * p
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return stat, len(cells) - 1


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty); z = 3.09 is the 0.001 level."""
    h = 2 / (9 * dof)
    return dof * (1 - h + z * math.sqrt(h)) ** 3


def law_without_residual(target, draft, ids, exact) -> dict[tuple, float]:
    """The law of a classic bug: on rejection, drawing from p instead of norm(max(0, p - q)).
    Each drafted position then follows min(p, q) + (1 - sum(min(p, q))) * p."""
    out = {}
    for key in exact:
        prob = sum(v for k, v in exact.items() if k[0] == key[0])  # the first token is plain
        for j in (1, 2):
            p = next_token_probs(target, ids + list(key[:j]), eos=1)
            q = next_token_probs(draft, ids + list(key[:j]), eos=1)
            overlap = sum(min(a, b) for a, b in zip(p, q))
            prob *= min(p[key[j]], q[key[j]]) + (1 - overlap) * p[key[j]]
        out[key] = prob
    return out


def test_assisted_sampling_keeps_the_target_distribution():
    """600 seeded samples of 3 tokens (27 outcomes) follow the target's exact law, and are far
    from the law of the classic residual bug: the test can tell the two apart."""
    target, draft = word_model(4), word_model(5)
    prompt = "a b a"
    ids = target.tokenizer(prompt)["input_ids"]
    exact = exact_distribution(target, ids, 3, eos=1)
    n = 600
    # max_new_tokens 4 with drafts of 2: tokens 2 and 3 are drafted and verified together.
    gen = api.stream(target, [prompt], raw=True, assistant=draft, assistant_model="words-5", do_sample=True,
                     top_k=0, seed=2024, num_return_sequences=n, max_new_tokens=4, min_new_tokens=4,
                     num_assistant_tokens=2)
    gen.run()
    counts = Counter(tuple(r.token_ids[:3]) for r in gen.results)
    stat, dof = chi_square(counts, exact, n)
    assert stat < chi_square_critical(dof), (stat, dof, counts.most_common(8))
    wrong, wrong_dof = chi_square(counts, law_without_residual(target, draft, ids, exact), n)
    assert wrong > chi_square_critical(wrong_dof)


def test_assisted_sampling_seeded_rows(tiny, assistant):
    """Each row drafts and accepts on its own with its own generator: a seeded prompt gives the
    same tokens alone and in a batch, and different seeds differ."""
    common = dict(do_sample=True, max_new_tokens=10, assistant=assistant, assistant_model="tiny-assistant")
    alone = genkit_generate(tiny, PROMPTS[:1], seed=3, **common)
    batch = genkit_generate(tiny, PROMPTS, seed=3, **common)
    assert alone[0] == batch[0]
    assert alone != genkit_generate(tiny, PROMPTS[:1], seed=4, **common)
    several = genkit_generate(tiny, PROMPTS[:1], seed=3, num_return_sequences=3, **common)
    assert len({tuple(s) for s in several}) == 3

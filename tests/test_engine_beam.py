"""Beam search, beam sampling and diverse beam search against transformers' generate()."""

import pytest

from helpers import genkit_generate, hf_generate

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]


# The random tiny model spreads its probability almost evenly, so a small bias on eos (id 2)
# makes hypotheses end at many different lengths: the finishing and stopping rules decide.
EOS_BIAS = [[[2], 0.9]]


def hf_params(params):
    """The same parameters in the form transformers takes."""
    out = dict(params)
    if "sequence_bias" in out:
        out["sequence_bias"] = {tuple(ids): bias for ids, bias in out["sequence_bias"]}
    return out


@pytest.mark.parametrize("params", [
    {"num_beams": 3},
    {"num_beams": 4, "num_return_sequences": 4},
    {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5, "sequence_bias": EOS_BIAS},
    {"num_beams": 3, "repetition_penalty": 1.3},
    {"num_beams": 3, "no_repeat_ngram_size": 2, "sequence_bias": EOS_BIAS},
    {"num_beams": 3, "min_new_tokens": 6, "sequence_bias": EOS_BIAS},
])
def test_beam_matches_transformers_tiny(tiny, params):
    ours = genkit_generate(tiny, PROMPTS, max_new_tokens=12, **params)
    theirs = hf_generate(tiny, PROMPTS, max_new_tokens=12, do_sample=False, **hf_params(params))
    assert ours == theirs
    assert len(ours) == len(PROMPTS) * params.get("num_return_sequences", 1)


@pytest.mark.parametrize("early_stopping, length_penalty", [
    (True, 1.0), (False, 1.0), ("never", 1.0), (False, -0.5), ("never", 2.0), (True, 0.0),
])
def test_beam_stopping_rules_with_eos_tiny(tiny, early_stopping, length_penalty):
    params = dict(num_beams=4, num_return_sequences=4, length_penalty=length_penalty, early_stopping=early_stopping)
    ours = genkit_generate(tiny, PROMPTS, max_new_tokens=16, sequence_bias=EOS_BIAS, **params)
    theirs = hf_generate(tiny, PROMPTS, max_new_tokens=16, **hf_params({"sequence_bias": EOS_BIAS, **params}))
    assert ours == theirs
    if early_stopping is True:
        assert any(row[-1] == 2 and len(row) < 16 for row in ours)


@pytest.mark.parametrize("params", [
    {"length_penalty": 0.0},
    {"length_penalty": -1.0, "early_stopping": True},
])
def test_beam_with_two_end_tokens_keeps_the_one_that_ended(tiny_two_eos, params):
    """transformers 5's beam search (like 4.x's) returns the end token that ended a
    hypothesis; only 4.x's group beam search replaced it (test_engine_diverse_fixtures.py)."""
    from conftest import SECOND_EOS

    params = dict(num_beams=4, num_return_sequences=4, **params)
    ours = genkit_generate(tiny_two_eos, PROMPTS + ["Hi"], max_new_tokens=10, **params)
    theirs = hf_generate(tiny_two_eos, PROMPTS + ["Hi"], max_new_tokens=10, **params)
    assert ours == theirs
    assert any(row[-1] == SECOND_EOS and len(row) < 10 for row in ours)


def test_beam_sampling_with_two_end_tokens_keeps_the_one_that_ended(tiny_two_eos):
    from conftest import SECOND_EOS

    import genkit

    # A bias on the second end token makes the random model's sampled beams reach it.
    gen = genkit.stream(tiny_two_eos, PROMPTS + ["Hi"], raw=True, num_beams=4, num_return_sequences=4,
                        do_sample=True, seed=2, length_penalty=0.0, sequence_bias=[[[SECOND_EOS], 2.0]],
                        max_new_tokens=10)
    gen.run()
    ended = [r for r in gen.results if r.finish_reason == "eos"]
    assert ended and all(r.token_ids[-1] == SECOND_EOS for r in ended)
    assert any(r.finish_reason == "length" for r in gen.results)


def test_beam_matches_transformers_embedded(embedded):
    # Chat prompts of different lengths, two hypotheses each, with a length and a repetition
    # penalty: one short run, as the embedded model is slow on this machine.
    prompts = ["What is the capital of France?", "Name three colours."]
    params = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, length_penalty=2.0, repetition_penalty=1.2)
    ours = genkit_generate(embedded, prompts, raw=False, **params)
    theirs = hf_generate(embedded, prompts, raw=False, **params)
    assert ours == theirs
    assert ours[0][-1] == 2  # the short answer ends at <|im_end|>


def test_beam_encoder_decoder(tiny_t5_dir):
    from genkit import models

    t5 = models.load(str(tiny_t5_dir))
    cases = ({"num_beams": 3},
             {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5, "sequence_bias": EOS_BIAS})
    for params in cases:
        ours = genkit_generate(t5, PROMPTS, max_new_tokens=8, **params)
        theirs = hf_generate(t5, PROMPTS, max_new_tokens=8, do_sample=False, **hf_params(params))
        assert ours == theirs


def test_beam_results_finish_reasons_and_logprobs(tiny):
    import torch

    from genkit import api

    gen = api.stream(tiny, PROMPTS, raw=True, max_new_tokens=6, num_beams=2, num_return_sequences=2,
                     logprobs=True)
    gen.run()
    assert [r.prompt_index for r in gen.results] == [0, 0, 1, 1]
    for r in gen.results:
        assert r.finish_reason == ("eos" if r.token_ids[-1] == 2 else "length")
        assert len(r.logprobs) == len(r.token_ids)
    # Each log-probability is the model's, for that token after the prompt and the tokens before it.
    r = gen.results[2]
    prompt = tiny.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    full = torch.cat([prompt, torch.tensor([r.token_ids])], dim=1)
    with torch.inference_mode():
        logits = tiny.model(full).logits[0, prompt.shape[1] - 1:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, full[0, prompt.shape[1]:, None]).squeeze(1)
    assert r.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_beam_stops_at_max_time(tiny):
    from genkit import api

    gen = api.stream(tiny, PROMPTS, raw=True, max_new_tokens=200, num_beams=3, num_return_sequences=2,
                     max_time=1e-6)
    gen.run()
    assert len(gen.results) == 4
    for r in gen.results:
        # The deadline passed before the first step: the best one-token hypotheses come back.
        assert len(r.token_ids) == 1
        assert r.finish_reason in ("time", "eos")


def test_beam_sampling_is_seeded_and_valid(tiny):
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=True, num_return_sequences=2)
    a = genkit_generate(tiny, PROMPTS, seed=5, **kw)
    b = genkit_generate(tiny, PROMPTS, seed=5, **kw)
    c = genkit_generate(tiny, PROMPTS, seed=6, **kw)
    assert a == b
    assert a != c
    assert len(a) == 4
    vocab = tiny.model.config.vocab_size
    for row in a:
        assert 0 < len(row) <= 10
        assert all(0 <= t < vocab for t in row)
        assert 2 not in row[:-1]  # eos only ever ends a hypothesis
    assert a[0] != a[1]  # two distinct hypotheses of one prompt


def test_beam_sampling_with_few_tokens_left(tiny):
    # top_k leaves fewer tokens than the candidates the step wants: still a valid search.
    rows = genkit_generate(tiny, PROMPTS[:1], seed=1, max_new_tokens=6, num_beams=4, do_sample=True, top_k=3)
    assert len(rows) == 1 and 0 < len(rows[0]) <= 6


@pytest.mark.parametrize("params", [
    {"num_beams": 4},
    {"num_beams": 4, "num_return_sequences": 3, "length_penalty": 0.5, "sequence_bias": EOS_BIAS},
    {"num_beams": 3, "num_return_sequences": 3, "early_stopping": True, "sequence_bias": EOS_BIAS},
    {"num_beams": 3, "num_return_sequences": 2, "early_stopping": "never", "sequence_bias": EOS_BIAS},
])
def test_diverse_beam_first_group_is_beam_search(tiny, params):
    """Nothing penalises the first group of a diverse beam search: under every finishing and
    stopping rule its hypotheses are those of a plain beam search of the group's size. Asked
    for every hypothesis (num_return_sequences = all beams), the diverse search returns them."""
    beams = params["num_beams"]
    diverse = dict(params, num_beams=2 * beams, num_beam_groups=2, diversity_penalty=5.0,
                   num_return_sequences=2 * beams)
    rows = genkit_generate(tiny, PROMPTS, max_new_tokens=12, **diverse)
    beam = genkit_generate(tiny, PROMPTS, max_new_tokens=12, **params)
    per = params.get("num_return_sequences", 1)
    for p in range(len(PROMPTS)):
        mine = rows[p * 2 * beams:(p + 1) * 2 * beams]
        assert all(r in mine for r in beam[p * per:(p + 1) * per])


def test_diverse_beam_groups_differ(tiny):
    rows = genkit_generate(tiny, PROMPTS, max_new_tokens=10, num_beams=4, num_beam_groups=2,
                           diversity_penalty=5.0, num_return_sequences=4)
    plain = genkit_generate(tiny, PROMPTS, max_new_tokens=10, num_beams=2, num_return_sequences=2)
    assert len(rows) == 8
    for p in range(len(PROMPTS)):
        mine = rows[p * 4:(p + 1) * 4]
        assert len({tuple(r) for r in mine}) == 4
        # The first group is a plain two-beam search: nothing penalises it.
        first = plain[p * 2:(p + 1) * 2]
        assert all(r in mine for r in first)
        # The second group pays 5 (far more than this model's spread of log-probabilities) for
        # any token the first group chose at the same step, so it opens with other tokens.
        second = [r for r in mine if r not in first]
        assert len(second) == 2
        assert not {r[0] for r in second} & {r[0] for r in first}


def test_diverse_beam_encoder_decoder_runs(tiny_t5_dir):
    from genkit import models

    t5 = models.load(str(tiny_t5_dir))
    rows = genkit_generate(t5, PROMPTS, max_new_tokens=6, num_beams=4, num_beam_groups=2,
                           diversity_penalty=1.0, num_return_sequences=2)
    assert len(rows) == 4 and all(0 < len(r) <= 6 for r in rows)

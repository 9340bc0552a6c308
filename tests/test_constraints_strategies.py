"""Constrained output with every strategy: beam and diverse beam search, beam sampling,
contrastive search, DoLa, assisted and prompt-lookup decoding, and the watermark.

Two kinds of checks. Validity: whatever finishes by eos parses and follows the schema (the
`jsonschema` package), whatever is cut by max_new_tokens says `length` and is incomplete.
Exactness, where it holds: constrained assisted and prompt-lookup decoding give plain
constrained decoding's tokens; constrained beam search gives what transformers' own beam search
gives with a grammar processor; a grammar that admits every token the model picks changes
nothing. The tiny random models spread their probability almost evenly, the hardest case for a
grammar: junk is always one step away.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

import genkit
from genkit import constraints
from genkit.engine import constrain

from conftest import _save_tiny, tiny_llama_config
from helpers import encode, strip_after_eos
from test_constraints import SCHEMAS, check_json

# Admits any text (the model's special tokens and stray bytes excepted): as good as no grammar.
ANYTHING = {"regex": r"(?s:.*)"}
# Quoted by prompt lookup's prompt: the drafts copy it, and the grammar cuts them where it differs.
LOOKUP_SCHEMA = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
                   "size": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["tags", "size"],
    "additionalProperties": False,
}
LOOKUP_PROMPT = ('{"tags": ["red", "green"], "size": 12} {"tags": ["blue"], "size": 7} '
                 '{"tags": ["green", "blue", "red"], "size": 40} {"tags": [')


def compact(schema: dict) -> dict:
    """The schema with at most one space between JSON tokens: a random model otherwise spends
    its tokens on indentation, and beams (which prefer it) seldom finish."""
    return dict(schema, **{"x-guidance": {"whitespace_pattern": " ?"}})


def run(lm, prompts, **params):
    return genkit.generate(lm, prompts, raw=True, **params).results


def validated(results, schema, at_least: int) -> int:
    """check_json, and enough rows finished for the check to mean something."""
    finished = check_json(results, schema)
    assert finished >= at_least, f"only {finished}/{len(results)} finished by eos: the test checks too little"
    return finished


# ------------------------------------------------------------------------ beam search

class _GrammarProcessor:
    """For transformers' generate(): each row's mask from a fresh matcher fed the row's tokens
    (stateless, so it follows beams however they reorder). What genkit's beams must match."""

    def __init__(self, lm, spec, prompt_length):
        from llguidance import LLMatcher

        self.template = LLMatcher(constrain.ll_tokenizer(lm, [2], 49152), constraints.grammar_for(spec, "test"))
        self.start = prompt_length

    def __call__(self, input_ids, scores):
        out = scores.clone()
        for r, row in enumerate(input_ids[:, self.start:].tolist()):
            m = self.template.deep_copy()
            if m.try_consume_tokens(row) < len(row):
                continue  # a dead beam (score -inf): its mask changes nothing
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = torch.from_numpy(bits[: scores.shape[-1]].astype(bool))
            out[r] = out[r].masked_fill(~allowed, -float("inf"))
        return out


def transformers_beam(lm, prompts, spec, **params):
    from transformers import LogitsProcessorList

    ids, mask = encode(lm, prompts)
    proc = _GrammarProcessor(lm, spec, ids.shape[1])
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=2,
                                logits_processor=LogitsProcessorList([proc]), **params)
    return [strip_after_eos(r, [2]) for r in out[:, ids.shape[1]:].tolist()]


BEAM_PROMPTS = ["Data:", "A record of a pet, as JSON:"]


@pytest.mark.parametrize("spec, params", [
    ({"json_schema": SCHEMAS[1]}, {"num_beams": 3}),
    ({"json_schema": SCHEMAS[0]}, {"num_beams": 4, "num_return_sequences": 3}),
    ({"regex": r"(ab|c)+-[0-9]{2,4}"}, {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.5}),
])
def test_beam_matches_transformers_with_a_grammar_processor(tiny, spec, params):
    ours = run(tiny, BEAM_PROMPTS, max_new_tokens=30, **spec, **params)
    theirs = transformers_beam(tiny, BEAM_PROMPTS, spec, max_new_tokens=30, **params)
    assert [r.token_ids for r in ours] == theirs
    assert len(ours) == len(BEAM_PROMPTS) * params.get("num_return_sequences", 1)


@pytest.mark.parametrize("params", [
    {"num_beams": 4, "num_return_sequences": 2},
    {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0, "num_return_sequences": 4},
    {"penalty_alpha": 0.6, "top_k": 4},
    {"dola_layers": "high"},
])
def test_a_grammar_that_admits_every_chosen_token_changes_nothing(tiny, params):
    plain = run(tiny, BEAM_PROMPTS, max_new_tokens=12, **params)
    admitted = run(tiny, BEAM_PROMPTS, max_new_tokens=12, **ANYTHING, **params)
    assert [r.token_ids for r in admitted] == [r.token_ids for r in plain]


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
@pytest.mark.parametrize("params", [
    {"num_beams": 4, "num_return_sequences": 4},
    {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 2.0, "num_return_sequences": 4},
])
def test_beam_and_diverse_beam_follow_schemas(tiny, index, params):
    schema = compact(SCHEMAS[index])
    results = run(tiny, BEAM_PROMPTS, json_schema=schema, max_new_tokens=80, **params)
    assert len(results) == 2 * params["num_return_sequences"]
    validated(results, schema, at_least=4)
    # A finished hypothesis is complete; the hypotheses of a prompt are distinct token sequences.
    assert all(r.complete is (r.finish_reason == "eos") for r in results)
    for p in range(2):
        rows = [tuple(r.token_ids) for r in results if r.prompt_index == p]
        assert len(set(rows)) == len(rows)


def test_beam_length_cut_is_incomplete_and_finished_hypotheses_complete(tiny):
    # Completeness is asked of the returned hypotheses (replayed), not of whatever beam row held them.
    short = run(tiny, ["Data:"], json_schema=SCHEMAS[0], num_beams=3, num_return_sequences=3, max_new_tokens=4)
    assert all(r.finish_reason == "length" and r.complete is False for r in short)
    done = run(tiny, ["x"], choice=["alpha", "beta", "gamma delta"], num_beams=3, num_return_sequences=3,
               max_new_tokens=10)
    # Two hypotheses may spell one word with different tokens ("beta", "b" + "eta").
    assert {r.text for r in done} <= {"alpha", "beta", "gamma delta"}
    assert all(r.finish_reason == "eos" and r.complete is True for r in done)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_sampling_follows_schemas(tiny, seed):
    schema = compact(SCHEMAS[seed])
    results = run(tiny, BEAM_PROMPTS, json_schema=schema, num_beams=3, do_sample=True, seed=seed,
                  num_return_sequences=3, max_new_tokens=80, temperature=1.3)
    validated(results, schema, at_least=3)


# ------------------------------------------------------------------------ contrastive, DoLa

@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_contrastive_follows_schemas(tiny, index):
    schema = SCHEMAS[index]
    prompts = ["Data:", "JSON please", "{", "Here it is:"]
    results = run(tiny, prompts, json_schema=schema, penalty_alpha=0.6, top_k=5, max_new_tokens=100)
    validated(results, schema, at_least=2)


def test_contrastive_never_picks_a_forbidden_candidate(tiny):
    # Two allowed tokens at most, top_k 6: four candidates have probability 0, and a low
    # degeneration penalty must not let one of them win.
    results = run(tiny, ["a", "b c d", "e"], choice=["yes", "no"], penalty_alpha=0.9, top_k=6, max_new_tokens=5)
    assert all(r.text in ("yes", "no") and r.finish_reason == "eos" and r.complete for r in results)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_dola_follows_schemas(tiny, index):
    schema = SCHEMAS[index]
    prompts = ["Data:", "JSON please", "{", "Here it is:"]
    results = run(tiny, prompts, json_schema=schema, dola_layers="high", repetition_penalty=1.2, max_new_tokens=100)
    validated(results, schema, at_least=2)


def test_dola_falls_back_when_no_plausible_token_is_allowed(tiny):
    # DoLa's plausibility cut keeps a handful of tokens; none of them spells these words.
    results = run(tiny, ["a", "b"], choice=["Xylophone", "Zebra crossing"], dola_layers="low", max_new_tokens=10,
                  do_sample=True, seed=3)
    assert all(r.text in ("Xylophone", "Zebra crossing") and r.finish_reason == "eos" for r in results)


# ------------------------------------------------------------------------ assisted, prompt lookup

@pytest.fixture(scope="module")
def draft_model(tmp_path_factory, embedded_dir):
    """Another tiny random Llama on the same tokenizer: its drafts are mostly rejected."""
    from genkit import models

    path = _save_tiny(tmp_path_factory.mktemp("tiny-draft"), tiny_llama_config(), embedded_dir, seed=7)
    return models.load(str(path))


@pytest.fixture
def settled(monkeypatch):
    """(tokens consumed tentatively, tokens the target kept) of every draft-and-verify cycle."""
    seen = []
    real = constrain.Draft.settle

    def spy(self, accepted, token):
        seen.append((self.pending, accepted))
        return real(self, accepted, token)

    monkeypatch.setattr(constrain.Draft, "settle", spy)
    return seen


SPECS = [{"json_schema": SCHEMAS[0]}, {"json_schema": SCHEMAS[1]}, {"json_schema": SCHEMAS[2]},
         {"regex": r"(ab|c)+-[0-9]{2,4}"}]


@pytest.mark.parametrize("spec", SPECS)
def test_assisted_greedy_equals_plain_greedy(tiny, draft_model, spec, settled):
    prompts = ["Data:", "A pet record:"]
    plain = run(tiny, prompts, max_new_tokens=60, **spec)
    for assistant, schedule in ((draft_model, "heuristic"), (tiny, "constant")):
        settled.clear()
        assisted = genkit.generate(tiny, prompts, raw=True, max_new_tokens=60, assistant=assistant,
                                   assistant_model="draft" if assistant is draft_model else "self",
                                   num_assistant_tokens=4, num_assistant_tokens_schedule=schedule, **spec).results
        assert [r.token_ids for r in assisted] == [r.token_ids for r in plain]
        assert [r.complete for r in assisted] == [r.complete for r in plain]
        drafted = sum(p for p, _ in settled)
        kept = sum(a for _, a in settled)
        if assistant is tiny:  # the target drafting for itself: everything is kept
            assert drafted > 0 and kept == drafted
        else:  # a different model: drafts rejected, the matcher rolled back
            assert kept < drafted


def test_assisted_sampling_follows_schemas(tiny, draft_model):
    schema = SCHEMAS[1]
    results = genkit.generate(tiny, ["Data:"] * 6, raw=True, json_schema=schema, do_sample=True, seed=5,
                              max_new_tokens=100, assistant=draft_model, assistant_model="draft",
                              num_assistant_tokens=3, top_k=0).results
    validated(results, schema, at_least=3)


@pytest.mark.parametrize("sample", [False, True])
def test_prompt_lookup_equals_plain_decoding(tiny, sample, settled):
    # The prompt is full of the schema's JSON: drafts copy it, and the grammar cuts them.
    params = dict(json_schema=LOOKUP_SCHEMA, max_new_tokens=60, num_return_sequences=1)
    if sample:
        params.update(do_sample=True, seed=11, top_k=0)
    prompts = [LOOKUP_PROMPT, "Another: " + LOOKUP_PROMPT]
    plain = run(tiny, prompts, **params)
    lookup = run(tiny, prompts, prompt_lookup_num_tokens=6, **params)
    assert [r.token_ids for r in lookup] == [r.token_ids for r in plain]
    drafted = sum(p for p, _ in settled)
    assert drafted > 0 and sum(a for _, a in settled) < drafted
    check_json(lookup, LOOKUP_SCHEMA)


def test_prompt_lookup_follows_schemas_over_seeds(tiny):
    results = []
    for seed in range(4):
        results += run(tiny, [LOOKUP_PROMPT], json_schema=LOOKUP_SCHEMA, prompt_lookup_num_tokens=8,
                       do_sample=True, seed=seed, max_new_tokens=80)
    validated(results, LOOKUP_SCHEMA, at_least=2)


# ------------------------------------------------------------------------ watermark

@pytest.mark.parametrize("params", [
    {"do_sample": True, "seed": 4, "num_return_sequences": 6},
    {"num_beams": 3, "num_return_sequences": 3},
    {"penalty_alpha": 0.6, "top_k": 4},
])
def test_watermarked_constrained_output(tiny, params):
    schema = SCHEMAS[1]
    mark = {"watermark": {"bias": 4.0}}
    marked = run(tiny, ["Data:"], json_schema=schema, max_new_tokens=80, **mark, **params)
    plain = run(tiny, ["Data:"], json_schema=schema, max_new_tokens=80, **params)
    validated(marked, schema, at_least=1)
    assert [r.token_ids for r in marked] != [r.token_ids for r in plain]  # the watermark did act


@pytest.mark.parametrize("params", [
    {}, {"do_sample": True}, {"num_beams": 2}, {"num_beams": 2, "do_sample": True},
    {"num_beams": 2, "num_beam_groups": 2, "diversity_penalty": 1.0}, {"penalty_alpha": 0.6, "top_k": 4},
    {"dola_layers": "high"}, {"assistant_model": "draft"}, {"prompt_lookup_num_tokens": 4},
])
def test_no_strategy_refuses_a_constraint(params):
    from genkit import params as P

    strategy = P.strategy_of(params)
    assert strategy in constraints.STRATEGIES
    constraints.check({"json_object": True}, strategy, "here")  # no GenkitError

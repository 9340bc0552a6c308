"""Every path through transformers' forward hands the KV cache over by the current name.

transformers 5.24 renamed the forward's `past_key_values` to `cache` and warns that the old
name goes in 5.40: genkit must not use it, and the cache must still be used (the output equals
transformers' own generate()).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest

from helpers import genkit_generate, hf_generate, on_backend

PROMPTS = ["The capital of France is", "Hi"]


@contextmanager
def no_old_cache_name():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def generate_without_old_name(lm, **params):
    with no_old_cache_name():
        return genkit_generate(lm, PROMPTS, max_new_tokens=8, **params)


@pytest.mark.parametrize("backend", ["transformers", "static"])
@pytest.mark.parametrize("params", [{}, {"num_beams": 3}])
def test_decoder_only_paths(tiny, backend, params):
    lm = on_backend(tiny, backend)
    assert generate_without_old_name(lm, **params) == hf_generate(tiny, PROMPTS, max_new_tokens=8, **params)


def test_encoder_decoder_path(tiny_t5_dir):
    from genkit import models

    t5 = models.load(str(tiny_t5_dir))
    assert generate_without_old_name(t5) == hf_generate(t5, PROMPTS, max_new_tokens=8)


def test_continuous_batching_path(tiny):
    from genkit import api
    from genkit.engine.continuous import ContinuousBatcher, Job

    lm = on_backend(tiny, "transformers")
    _, s = api.settings_for(lm, max_new_tokens=8)
    jobs = [Job(i, tiny.tokenizer(t)["input_ids"], 0, 8) for i, t in enumerate(PROMPTS)]
    with no_old_cache_name():
        got = {r.handle: r.sequences[0].token_ids for r in ContinuousBatcher(lm, s, batch_size=2).run(jobs)}
    assert [got[0], got[1]] == [hf_generate(tiny, [p], max_new_tokens=8)[0] for p in PROMPTS]

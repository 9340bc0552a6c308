"""Contrastive search and DoLa: token ids equal to transformers 4.55's, and their defining properties.

The expected ids come from transformers 4.55.4 (tests/fixtures/*_455.json, recorded by
scripts/make_fixtures_455.py), the last release that had both strategies in its core.
"""

from __future__ import annotations

import pytest

import parity455
from helpers import genkit_generate, hf_generate

CONTRASTIVE = parity455.load("contrastive_455.json")
DOLA = parity455.load("dola_455.json")
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a", "Hi"]


# ---------------------------------------------------------------- contrastive search


@pytest.mark.parametrize("case", CONTRASTIVE["cases"], ids=parity455.case_id)
def test_contrastive_matches_transformers_455(request, fixture_models, case):
    lm = fixture_models.get(request, CONTRASTIVE, case["model"])
    # On the tiny models 4.55's padded rows fall into NaN similarities and decode greedily
    # (scripts/make_fixtures_455.py explains); there each row must equal 4.55's row run alone.
    expected = case.get("output_ids_alone", case["output_ids"])
    assert parity455.run_case(lm, case) == expected


def test_contrastive_vanishing_penalty_is_greedy(tiny):
    """With a vanishing degeneration penalty (alpha 0 itself selects greedy by the parameter
    rules) the most probable candidate wins: greedy decoding, here checked against transformers
    5's own greedy on a padded batch."""
    from genkit.engine import settings as settings_mod
    from genkit import params as P

    params = dict(penalty_alpha=1e-7, top_k=4, max_new_tokens=16)
    assert settings_mod.build(tiny, P.check_params(params, "test")).strategy == "contrastive"
    assert genkit_generate(tiny, PROMPTS, **params) == hf_generate(tiny, PROMPTS, max_new_tokens=16, do_sample=False)


def test_contrastive_penalty_changes_the_choice(tiny):
    """The penalty matters: at a high alpha the tiny model's output leaves the greedy path."""
    greedy = genkit_generate(tiny, PROMPTS, max_new_tokens=16)
    contrastive = genkit_generate(tiny, PROMPTS, penalty_alpha=0.9, top_k=8, max_new_tokens=16)
    assert contrastive != greedy


def test_contrastive_row_alone_equals_row_in_batch(tiny):
    """Padding is masked out of the degeneration penalty: a row's tokens do not depend on the
    other prompts of its batch."""
    batch = genkit_generate(tiny, PROMPTS, penalty_alpha=0.6, top_k=4, max_new_tokens=12)
    alone = [genkit_generate(tiny, [p], penalty_alpha=0.6, top_k=4, max_new_tokens=12)[0] for p in PROMPTS]
    assert batch == alone


def test_degeneration_penalty_ignores_padding():
    import torch

    from genkit.engine.strategies.contrastive import degeneration_penalty

    context = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    candidates = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    full = degeneration_penalty(context, torch.tensor([[1, 1]]), candidates)
    padded = degeneration_penalty(context, torch.tensor([[0, 1]]), candidates)
    assert full.tolist() == [[1.0, 1.0]]
    assert padded.tolist() == [[0.0, 1.0]]  # the first position is padding: only the second counts


# ---------------------------------------------------------------- DoLa


@pytest.mark.parametrize("case", DOLA["cases"], ids=parity455.case_id)
def test_dola_matches_transformers_455(request, fixture_models, case):
    lm = fixture_models.get(request, DOLA, case["model"])
    assert parity455.run_case(lm, case) == case["output_ids"]


# The documents' rules: N <= 40 layers: low = range(0, N // 2, 2), high = range(N // 2, N, 2);
# N > 40: low = range(0, 20, 2), high = range(N - 20, N, 2); tied embeddings: low skips layer 0.
LAYER_RULES = [
    (12, False, "low", [0, 2, 4]),
    (12, False, "high", [6, 8, 10]),
    (12, True, "low", [2, 4]),
    (12, True, "high", [6, 8, 10]),
    (30, False, "low", [0, 2, 4, 6, 8, 10, 12, 14]),
    (30, False, "high", [15, 17, 19, 21, 23, 25, 27, 29]),
    (30, True, "low", [2, 4, 6, 8, 10, 12, 14]),
    (30, True, "high", [15, 17, 19, 21, 23, 25, 27, 29]),
    (48, False, "low", [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]),
    (48, False, "high", [28, 30, 32, 34, 36, 38, 40, 42, 44, 46]),
    (48, True, "low", [2, 4, 6, 8, 10, 12, 14, 16, 18]),
    (48, True, "high", [28, 30, 32, 34, 36, 38, 40, 42, 44, 46]),
    (12, True, [0, 5, 11], [0, 5, 11]),  # a list is taken as given, tied or not
    (48, False, [28, 30], [28, 30]),
    (2, True, "low", [1]),  # too shallow to skip two layers: 4.55 starts at layer 1
    (4, True, "low", [2]),
]


@pytest.mark.parametrize("layers,tied,dola_layers,expected", LAYER_RULES)
def test_dola_layer_selection(layers, tied, dola_layers, expected):
    from genkit.engine.dola_layers import dola_layer_indices

    assert dola_layer_indices(layers, dola_layers, tied) == expected


@pytest.mark.parametrize("dola_layers", [[12], [3, 13], [30]])
def test_dola_unknown_layer_is_an_error(dola_layers):
    from genkit.engine.dola_layers import dola_layer_indices
    from genkit.errors import GenkitError

    with pytest.raises(GenkitError, match="does not exist"):
        dola_layer_indices(12, dola_layers, False)


def test_dola_unknown_layer_fails_before_generation(tiny):
    """One clear error when the settings are built, before any token is generated."""
    from genkit import api
    from genkit.errors import GenkitError

    with pytest.raises(GenkitError, match="layer 2 does not exist in this 2-layer model"):
        api.stream(tiny, "Hello", dola_layers=[0, 2], max_new_tokens=4)


def test_dola_adaptive_plausibility():
    """Only tokens with at least 0.1 of the top final-layer probability survive; the survivors
    score log p_final - log p_premature."""
    import math

    import torch

    from genkit.engine.strategies.dola import contrast

    final = torch.log(torch.tensor([[0.6, 0.33, 0.05, 0.02]]))  # 0.05 < 0.1 * 0.6
    base = torch.log(torch.tensor([[0.1, 0.6, 0.2, 0.1]]))
    out = contrast(final, base)[0]
    assert out[2] == float("-inf") and out[3] == float("-inf")
    assert out[0].item() == pytest.approx(math.log(0.6 / 0.1), abs=1e-5)
    assert out[1].item() == pytest.approx(math.log(0.33 / 0.6), abs=1e-5)

"""Diverse (group) beam search: token ids equal to transformers 4.55's.

transformers 5 moved group beam search out of its core, so the expected ids come from
transformers 4.55.4 (tests/fixtures/diverse_beam_455.json, recorded by
scripts/make_fixtures_455.py): every returned sequence of every prompt, in 4.55's order (best
first within a prompt), on the exact left-padded inputs that 4.55 saw.
"""

from __future__ import annotations

import pytest

import parity455

pytest.importorskip("genkit.engine.strategies.beam", reason="genkit's beam search is not written yet")

DIVERSE = parity455.load("diverse_beam_455.json")


@pytest.mark.parametrize("case", DIVERSE["cases"], ids=parity455.case_id)
def test_diverse_beam_matches_transformers_455(request, fixture_models, case):
    lm = fixture_models.get(request, DIVERSE, case["model"])
    assert parity455.run_case(lm, case) == case["output_ids"]

"""Replaying transformers 4.55 fixtures (tests/fixtures/*_455.json) through genkit's engine.

scripts/make_fixtures_455.py recorded, for each case, the exact left-padded input ids that 4.55's
`generate()` saw and the token ids it produced. Here the same models are rebuilt (the embedded
SmolLM2, or a tiny random Llama from tests/conftest.py's recipe and seed, checked by a hash of
its weights) and genkit runs on the very same input ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def case_id(case: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in case["params"].items() if k != "max_new_tokens")
    return f"{case['model']}-{case['batch']}-{params}".replace(" ", "")


def weights_sha256(model) -> str:
    """The same hash as the fixture script's: every weight, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


class ModelCache:
    """Loads each fixture model once per test session."""

    def __init__(self, tmp_path_factory, embedded_dir):
        self.tmp = tmp_path_factory
        self.embedded_dir = embedded_dir
        self.loaded = {}

    def get(self, request, fixture: dict, name: str):
        """The model `name` of a fixture file; `request` is the test's, for the embedded model."""
        if name == "embedded":
            return request.getfixturevalue("embedded")
        if name not in self.loaded:
            self.loaded[name] = self._tiny(name, fixture["models"][name])
        return self.loaded[name]

    def _tiny(self, name: str, spec: dict):
        from conftest import _save_tiny, tiny_llama_config

        from genkit import models

        path = _save_tiny(self.tmp.mktemp(name), tiny_llama_config(**spec["overrides"]), self.embedded_dir,
                          seed=spec["seed"])
        lm = models.load(str(path))
        if weights_sha256(lm.model) != spec["weights_sha256"]:
            pytest.fail(f"{name}: rebuilt weights differ from the fixture's (tests/conftest.py's tiny model "
                        "recipe changed?): re-run scripts/make_fixtures_455.py")
        return lm


def run_case(lm, case: dict) -> list[list[int]]:
    """genkit's new token ids per returned row, on the case's exact inputs and parameters."""
    from genkit import params as P
    from genkit.engine import Generation
    from genkit.engine import settings as settings_mod

    settings = settings_mod.build(lm, P.check_params(dict(case["params"]), "fixture"))
    ids = torch.tensor(case["input_ids"])
    mask = torch.tensor(case["attention_mask"])
    gen = Generation(lm, [""] * ids.shape[0], settings, raw=True, inputs=(ids, mask))
    gen.run()
    return [r.token_ids for r in gen.results]

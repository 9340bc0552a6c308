"""One seeding rule for every way genkit samples (the API, run, compare and batch).

A generation has a base seed: the one the user passed, or a fresh random one (reported, so any
sampled answer can be reproduced). Each row, a prompt of a list or a record of a batch job,
samples with a seed derived from the base seed and the row's identity: its position in the
list, or its id in the job. So rows never share a seed (three copies of one prompt give three
answers), a row's text does not depend on what else shares its batch, and the same base seed
gives the same texts. The first row (identity 0) samples with the base seed itself, so a single
prompt with `--seed S` samples with S.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def row_seed(base_seed: int, identity: Any) -> int:
    """The seed of the row `identity` (an index, or a record's id) under `base_seed`."""
    if identity == 0 and not isinstance(identity, bool):
        return base_seed
    key = json.dumps(identity, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def fresh_seed() -> int:
    """A base seed for a generation that names none."""
    return int.from_bytes(os.urandom(4), "little")

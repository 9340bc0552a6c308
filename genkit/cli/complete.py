"""Shell completion (Typer's own: `genkit --install-completion`) for preset and model names.

Runs on every Tab press, so it reads directory listings only: no torch, no model.
"""

from __future__ import annotations

import os
from pathlib import Path


def preset_names(incomplete: str) -> list[str]:
    from genkit import presets

    try:
        names = presets.available()
    except Exception:  # a broken user preset directory must not break the shell
        return []
    return sorted(n for n in names if n.startswith(incomplete))


def model_names(incomplete: str) -> list[str]:
    """genkit's cached models (their directories, which --model takes) and hub ids in the
    Hugging Face cache (models--org--name)."""
    found = [str(p) for p in _children(_genkit_models())]
    found += [d.name[len("models--"):].replace("--", "/") for d in _children(_hub_cache())
              if d.name.startswith("models--")]
    return sorted(m for m in found if m.startswith(incomplete))


def _genkit_models() -> Path:
    from genkit import models

    return models.models_dir()


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def _children(root: Path) -> list[Path]:
    try:
        return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and ".tmp-" not in p.name]
    except OSError:
        return []

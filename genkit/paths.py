"""Where genkit keeps things: its cache of converted models, the user's presets and history,
and the log of conversations.

`GENKIT_HOME` puts everything under one directory (handy for tests and CI); otherwise the XDG
base directories are used.
"""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


def _genkit_dir(kind: str, xdg_var: str, fallback: str) -> Path:
    """GENKIT_HOME/<kind> when GENKIT_HOME is set (tests, a self-contained install), else the
    XDG directory of that kind."""
    home = os.environ.get("GENKIT_HOME")
    if home:
        return Path(home) / kind
    return _xdg(xdg_var, fallback) / "genkit"


def cache_dir() -> Path:
    return _genkit_dir("cache", "XDG_CACHE_HOME", ".cache")


def config_dir() -> Path:
    return _genkit_dir("config", "XDG_CONFIG_HOME", ".config")


def data_dir() -> Path:
    """What genkit records for the user (the SQLite log of conversations and runs)."""
    return _genkit_dir("data", "XDG_DATA_HOME", ".local/share")


def user_presets_dir() -> Path:
    return config_dir() / "presets"


def builtin_presets_dir() -> Path:
    # Installed from a wheel the presets sit inside the package; in a source checkout (or an
    # editable install) they are at the repository root.
    inside = Path(__file__).parent / "presets"
    return inside if inside.is_dir() else Path(__file__).parent.parent / "presets"

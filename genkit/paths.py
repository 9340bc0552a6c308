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


def cache_dir() -> Path:
    home = os.environ.get("GENKIT_HOME")
    if home:
        return Path(home) / "cache"
    return _xdg("XDG_CACHE_HOME", ".cache") / "genkit"


def config_dir() -> Path:
    home = os.environ.get("GENKIT_HOME")
    if home:
        return Path(home) / "config"
    return _xdg("XDG_CONFIG_HOME", ".config") / "genkit"


def data_dir() -> Path:
    """What genkit records for the user (the SQLite log of conversations and runs)."""
    home = os.environ.get("GENKIT_HOME")
    if home:
        return Path(home) / "data"
    return _xdg("XDG_DATA_HOME", ".local/share") / "genkit"


def user_presets_dir() -> Path:
    return config_dir() / "presets"


def builtin_presets_dir() -> Path:
    # Installed from a wheel the presets sit inside the package; in a source checkout (or an
    # editable install) they are at the repository root.
    inside = Path(__file__).parent / "presets"
    return inside if inside.is_dir() else Path(__file__).parent.parent / "presets"

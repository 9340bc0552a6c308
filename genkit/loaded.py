"""What loading returns: a model and its tokenizer ready for genkit's engine (LoadedModel), and
what every loader does to them (the tokenizer's pad token and padding side, transformers'
progress bars and advice kept off the terminal while it works).

A bottom layer: genkit.models (which decides what to load) and genkit.native.gguf_load (which
loads a .gguf natively) both build LoadedModels.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    source: str
    path: str  # where the weights were read from
    info: dict = field(default_factory=dict)
    # The runner that decodes it (genkit/engine/backends.py), chosen once at load; a model
    # built by hand gets the automatic choice.
    backend: Any = None
    tokenizer_wraps: dict = field(default_factory=dict)  # llguidance's view of the tokenizer, per eos ids
    drafts: dict = field(default_factory=dict)  # assisted decoding's draft models, by name

    def __post_init__(self):
        if self.backend is None:
            from genkit.engine import backends

            self.backend = backends.choose(self.model)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def device(self):
        return self.model.device

    @property
    def context_length(self) -> int | None:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def fix_tokenizer(tokenizer, model) -> None:
    """The documents' tokenizer pitfalls, handled once: a pad token and left padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
    # Decoder-only models continue from the last position of each row, so padding must sit on
    # the left; encoder-decoder models read the whole input and pad on the right.
    tokenizer.padding_side = "right" if getattr(model.config, "is_encoder_decoder", False) else "left"


@contextlib.contextmanager
def quiet_transformers(gguf: bool = False):
    """Silence transformers' progress bars and advice while genkit reports its own progress.

    transformers' own bars follow `disable_progress_bar()`; its GGUF reader (`gguf`: for the
    blocks that run it) calls `tqdm.auto.tqdm` directly, which read TQDM_DISABLE when tqdm was
    imported (setting it now would do nothing), so that module's `tqdm` is swapped for a disabled
    one meanwhile. Only then is that module imported: it pulls in transformers' GGUF tokenizer
    mappings, about 0.6 s that a native load never needs."""
    from transformers.utils import logging as hf_logging

    gguf_utils = None
    if gguf:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm

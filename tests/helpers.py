"""Helpers for parity tests: run transformers' own generate() on the same inputs as genkit."""

from __future__ import annotations

import torch

from genkit import prompts


def encode(lm, texts, raw=True):
    """Left-padded inputs exactly as genkit builds them."""
    templated = prompts.uses_chat(lm, raw)
    full = [prompts.to_text(lm, t, raw=raw) for t in texts]
    ids, mask, _ = prompts.encode(lm, full, templated=templated, max_new_tokens=0)
    return ids, mask


def strip_after_eos(ids: list[int], eos_ids, pad_id=None) -> list[int]:
    """transformers pads finished rows; genkit stops at the first eos (kept)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


def hf_generate(lm, texts, raw=True, **kwargs) -> list[list[int]]:
    """New token ids per output row from transformers' generate()."""
    ids, mask = encode(lm, texts, raw=raw)
    eos = lm.model.generation_config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    kwargs.setdefault("pad_token_id", lm.tokenizer.pad_token_id)
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    start = 0 if lm.is_encoder_decoder else ids.shape[1]
    rows = out[:, start:].tolist()
    if lm.is_encoder_decoder:
        rows = [r[1:] for r in rows]  # drop decoder_start_token_id
    return [strip_after_eos(r, eos_ids) for r in rows]


def genkit_generate(lm, texts, raw=True, **params) -> list[list[int]]:
    from genkit import api

    gen = api.stream(lm, list(texts), raw=raw, **params)
    gen.run()
    return [r.token_ids for r in gen.results]


def on_backend(lm, backend: str):
    """`lm`'s weights and tokenizer decoded by another runner (genkit/engine/backends.py: auto,
    transformers, static, static-eager), as `--backend` would choose it at load."""
    import dataclasses

    from genkit.engine import backends

    return dataclasses.replace(lm, backend=backends.choose(lm.model, backend))

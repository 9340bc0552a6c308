"""Turn genkit's parameter dict into what the decode loop needs.

The user's parameters (preset + flags) sit on top of the model's own generation config; the
result is one `DecodeSettings` with every parameter filled in, plus a transformers
`GenerationConfig` built from it for the processors and for saving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from genkit import params as P
from genkit.engine.dola_layers import layers_for
from genkit.errors import GenkitError

# Parameters of the model's generation_config.json that genkit takes as the model's defaults.
# Constraints are the request's, never the model's.
MODEL_CONFIG_KEYS = set(P.PARAMS) - {"seed", "assistant_model", "watermark", "json_schema", "json_object", "regex",
                                     "choice", "grammar"}


@dataclass(kw_only=True)
class DecodeSettings:
    """Every generation parameter (genkit/params.py) as the engine will use it, plus what
    `build` derives from them. A field per parameter, typed, so a misspelt name fails where it
    is read and an editor knows what each holds; a test keeps the fields and PARAMS in step.
    The defaults are PARAMS' (max_new_tokens: genkit's own, never "no limit")."""

    # length and stopping
    max_new_tokens: int = P.DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int | None = None
    max_time: float | None = None
    stop_strings: list[str] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    # strategy
    do_sample: bool = False
    num_beams: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1
    penalty_alpha: float | None = None
    dola_layers: str | list[int] | None = None  # "low", "high" or layer indices
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "constant"
    assistant_model: str | None = None
    # sampling warpers
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    # logits processors
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    sequence_bias: list[list] | None = None  # [[token ids], bias] pairs
    suppress_tokens: list[int] | None = None
    watermark: dict[str, Any] | None = None
    # constrained output: at most one of these
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # genkit's own
    seed: int | None = None

    # derived by `build`
    strategy: str = "greedy"  # as genkit.params.strategy_of names it
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    explicit: dict[str, Any] = field(default_factory=dict)  # what the user set (for reports)

    def params(self) -> dict[str, Any]:
        """The generation parameters by name, as genkit/params.py lists them."""
        return {name: getattr(self, name) for name in P.PARAMS}

    def generation_config(self):
        """The same settings as a transformers GenerationConfig."""
        gc = to_generation_config(self.params())
        gc.eos_token_id = self.eos_ids if len(self.eos_ids) != 1 else self.eos_ids[0]
        gc.pad_token_id = self.pad_id
        return gc


def to_generation_config(values: dict):
    """A transformers GenerationConfig holding genkit's parameters (defaults left out).

    `seed` and `assistant_model` have no GenerationConfig field; they are stored as extra
    attributes, which GenerationConfig saves and reads back."""
    from transformers import GenerationConfig, WatermarkingConfig

    from genkit.presets import diff_from_defaults

    kwargs = diff_from_defaults(values)
    if "sequence_bias" in kwargs:
        kwargs["sequence_bias"] = [[list(ids), b] for ids, b in kwargs["sequence_bias"]]
    if "watermark" in kwargs:
        kwargs["watermarking_config"] = WatermarkingConfig(**kwargs.pop("watermark"))
    return GenerationConfig(**kwargs)


def model_defaults(model) -> dict:
    """The parameters a model's own generation config sets (ignoring transformers' defaults)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return {}
    out = {}
    for k, v in gc.to_diff_dict().items():
        if k in MODEL_CONFIG_KEYS and v is not None:
            try:
                out.update([P.check_param(k, v, "model generation config")])
            except GenkitError:
                pass  # a value genkit cannot use is ignored, the model still runs
    # The old 20-token max_length default must not silently cap generation.
    out.pop("max_length", None)
    return out


def _token_ids(values: dict, pad: int) -> dict[str, list[int]]:
    """Every setting that names token ids, flattened (the pad id as it will be used)."""
    eos = values["eos_token_id"]
    return {
        "suppress_tokens": list(values["suppress_tokens"] or []),
        "bad_words_ids": [t for ids in values["bad_words_ids"] or [] for t in ids],
        "sequence_bias": [t for ids, _ in values["sequence_bias"] or [] for t in ids],
        "eos_token_id": [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        "pad_token_id": [pad],
        "bos_token_id": [] if values["bos_token_id"] is None else [values["bos_token_id"]],
        "decoder_start_token_id": [] if values["decoder_start_token_id"] is None else [values["decoder_start_token_id"]],
    }


def _check_token_ids(values: dict, pad: int, vocab: int) -> None:
    """A token id outside the vocabulary fails here, as one line, not as an index error
    deep inside a decode step."""
    for key, ids in _token_ids(values, pad).items():
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise GenkitError(f"{key}: token id {bad} is outside the vocabulary (ids 0 to {vocab - 1})")


def build(lm, generation: dict) -> DecodeSettings:
    """Effective settings for one request on a loaded model."""
    merged = {**model_defaults(lm.model), **{k: v for k, v in generation.items() if v is not None}}
    P.check_combination(merged, "settings")
    values = P.effective(merged)
    if values["max_new_tokens"] is None:
        values["max_new_tokens"] = P.DEFAULT_MAX_NEW_TOKENS
    eos = values["eos_token_id"]
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = values["pad_token_id"]
    if pad is None:
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    if values["dola_layers"] is not None and lm.is_encoder_decoder:
        raise GenkitError("DoLa (dola_layers) works with decoder-only models only")
    if values["dola_layers"] is not None:
        layers_for(lm.model, values["dola_layers"])  # an unknown layer fails here, before generation
    if values["penalty_alpha"] and lm.is_encoder_decoder:
        raise GenkitError("contrastive search (penalty_alpha) works with decoder-only models only")
    _check_token_ids(values, pad, lm.model.config.get_text_config().vocab_size)
    return DecodeSettings(
        **values,
        strategy=P.strategy_of(merged),
        eos_ids=eos_ids,
        pad_id=pad,
        explicit=dict(generation),
    )

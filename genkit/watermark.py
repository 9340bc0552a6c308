"""Watermark detection for text generated with genkit's `watermark` setting.

Generation with a watermark adds `bias` to the logits of a pseudo-random "green" share
(`greenlist_ratio`) of the vocabulary, drawn afresh at every position from the previous token(s)
(Kirchenbauer et al., "On the Reliability of Watermarks for Large Language Models"; transformers'
WatermarkLogitsProcessor). Text written that way holds many more green tokens than the share
chance gives; detection counts them and reports a z-score and its one-sided p-value, using
transformers' WatermarkDetector.

    detector = Detector.for_model(None, {"bias": 2.5})   # the embedded model's vocabulary
    detector.score("some text").prediction

Detection needs what decided the green lists at generation time, and nothing else: the
tokenizer and vocabulary size (not the weights), the watermark settings (greenlist_ratio,
seeding_scheme, context_width, hashing_key; bias only changes how strong the mark is), and the
device type (CPU and CUDA random generators draw different green lists).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from genkit import params as P
from genkit.errors import GenkitError

DEFAULT_Z_THRESHOLD = 3.0  # transformers' WatermarkDetector default: p about 0.0013


@dataclass
class Detection:
    """The verdict on one text; `error` says why a text could not be scored."""

    num_tokens_scored: int
    num_green_tokens: int
    green_fraction: float | None
    z_score: float | None
    p_value: float | None
    prediction: bool  # True: watermarked
    error: str | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        if out["error"] is None:
            del out["error"]
        return out


def settings(preset: str | None = None, where: str = "watermark", **overrides) -> dict:
    """Watermark settings, every key filled: defaults < the preset's `watermark` < overrides."""
    base: dict = {}
    if preset:
        from genkit import presets

        loaded = presets.load(preset)
        base = loaded.generation.get("watermark")
        if base is None:
            raise GenkitError(f"preset '{loaded.name}' ({loaded.source}) has no watermark settings: "
                              "pass another preset or the flags (--greenlist-ratio, --seeding-scheme, ...)")
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    _, checked = P.check_param("watermark", merged, where)
    return {key: checked.get(key, default) for key, (_, default) in P.WATERMARK_KEYS.items()}


class Detector:
    """transformers' WatermarkDetector over one model's vocabulary, one text at a time (a
    padded batch would score the padding)."""

    def __init__(self, config, tokenizer, watermark: dict, *, device: str = "cpu",
                 z_threshold: float = DEFAULT_Z_THRESHOLD, ignore_repeated_ngrams: bool = False):
        from transformers import WatermarkDetector, WatermarkingConfig

        self.tokenizer = tokenizer
        self.watermark = {**{k: d for k, (_, d) in P.WATERMARK_KEYS.items()}, **watermark}
        self.z_threshold = z_threshold
        # The vocabulary size the generation's processor used (genkit/engine/core.py).
        text_config = config.get_text_config()
        self.detector = WatermarkDetector(
            model_config=text_config, device=_device(device),
            watermarking_config=WatermarkingConfig(**self.watermark),
            ignore_repeated_ngrams=ignore_repeated_ngrams,
        )
        self.bos_id = self.detector.bos_token_id

    @classmethod
    def for_model(cls, model: str | None, watermark: dict, **options) -> Detector:
        """For `--model` as `genkit run` takes it, reading its config and tokenizer only."""
        config, tokenizer = load_vocabulary(model)
        return cls(config, tokenizer, watermark, **options)

    @classmethod
    def for_loaded(cls, lm, watermark: dict, **options) -> Detector:
        """For a model already loaded with `genkit.load`."""
        return cls(lm.model.config, lm.tokenizer, watermark, **options)

    def score(self, text: str) -> Detection:
        """The verdict on a text as a person has it (the prompt left out)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.score_ids(ids)

    def score_ids(self, ids: list[int]) -> Detection:
        """The verdict on generated token ids."""
        import torch

        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        # The first context_width tokens only seed the green list of the next one.
        needed = self.watermark["context_width"] + 1
        if len(ids) < needed:
            return Detection(0, 0, None, None, None, False,
                             error=f"too short to score: {len(ids)} token(s), at least {needed} needed")
        out = self.detector(torch.tensor([ids], device=self.detector.processor.rng.device),
                            z_threshold=self.z_threshold, return_dict=True)
        z = float(out.z_score[0])
        return Detection(
            num_tokens_scored=int(out.num_tokens_scored[0]),
            num_green_tokens=int(out.num_green_tokens[0]),
            green_fraction=round(float(out.green_fraction[0]), 6),
            z_score=round(z, 6) if math.isfinite(z) else None,
            p_value=float(out.p_value[0]),
            prediction=bool(out.prediction[0]),
        )


def detect(texts: list[str], model=None, watermark: dict | None = None, **options) -> list[Detection]:
    """Verdicts for texts; `model` is a name as `--model` takes it or a loaded model."""
    wm = settings(**(watermark or {}))
    if model is not None and hasattr(model, "tokenizer"):
        detector = Detector.for_loaded(model, wm, **options)
    else:
        detector = Detector.for_model(model, wm, **options)
    return [detector.score(t) for t in texts]


def load_vocabulary(model: str | None):
    """(config, tokenizer) of a model without its weights."""
    from transformers import AutoConfig, AutoTokenizer

    from genkit import models
    from genkit.loaded import quiet_transformers

    _, _, location = models.resolve_source(model)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(location), AutoTokenizer.from_pretrained(location)
    except Exception as e:  # transformers raises OSError, ValueError, ... for a missing model
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GenkitError(f"cannot read the tokenizer of model '{model or location}': {first}") from None


def _device(name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise GenkitError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenkitError(f"--device {name}: no CUDA device here; the green lists of a text generated "
                          "on a GPU can only be drawn on a GPU")
    return str(device)

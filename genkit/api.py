"""The public Python API; the CLI and the batch runner use the same functions."""

from __future__ import annotations

from dataclasses import dataclass

from genkit import models
from genkit import params as P
from genkit import presets as presets_mod
from genkit.engine import Generation, SequenceResult, Stats
from genkit.engine import settings as settings_mod
from genkit.errors import GenkitError


def load(model: str | None = None, **options) -> models.LoadedModel:
    """Load a model: None (embedded default), a directory, a .gguf file or a hub id.

    Options: dtype, device_map, load_in_4bit, load_in_8bit, quant_type, compute_dtype,
    trust_remote_code, native_4bit, native_8bit, int8_activations, threads, dequantize, backend
    (see genkit.loadopts.LoadOptions); `progress` takes a callable that receives status lines.
    """
    progress = options.pop("progress", None)
    return models.load(model, models.LoadOptions(**options), progress=progress)


def settings_for(lm, preset: str | None = None, generation_config: str | None = None, vars=None, **params):
    """(preset, decode settings) for a request: model < preset < config file < params."""
    overrides = P.check_params({k: v for k, v in params.items() if v is not None}, "parameters")
    resolved = presets_mod.resolve(preset, generation_config, overrides, vars)
    return resolved, settings_mod.build(lm, resolved.generation)


def prepare(lm, resolved: presets_mod.Preset, prompts: list, *, system: str | None = None, settings=None,
            **options) -> Generation:
    """The one way a resolved preset and prompts become a Generation (the API, run, compare and
    chat): the preset's settings on this model unless `settings` are given, each text prompt
    through the preset's template (a list of messages is taken as it is), and the preset's
    system prompt unless `system` is given. `options` are Generation's (raw, streamer, logprobs,
    assistant, turn_cache); Generation loads the draft model once per target model and seeds
    each row by genkit/seeding.py's rule."""
    if settings is None:
        settings = settings_mod.build(lm, resolved.generation)
    texts = [presets_mod.render_prompt(resolved, p) if isinstance(p, str) else p for p in prompts]
    return Generation(lm, texts, settings, system=system if system is not None else resolved.system, **options)


def stream(
    lm,
    prompt,
    *,
    preset: str | None = None,
    generation_config: str | None = None,
    system: str | None = None,
    raw: bool = False,
    vars: dict | None = None,
    streamer=None,
    logprobs: bool = False,
    assistant=None,
    **params,
) -> Generation:
    """A Generation to iterate over: events as tokens are accepted; `.results` at the end.

    `prompt` is a string, a list of chat messages, or a list of either (a batch).
    """
    resolved, s = settings_for(lm, preset, generation_config, vars, **params)
    batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], dict) else [prompt]
    return prepare(lm, resolved, batch, system=system, settings=s, raw=raw, streamer=streamer, logprobs=logprobs,
                   assistant=assistant)


@dataclass
class Result:
    results: list[SequenceResult]
    stats: Stats
    seed: int

    @property
    def text(self) -> str:
        return self.results[0].text

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.results]


def generate(lm, prompt, **kwargs) -> Result:
    """Generate to the end; same arguments as `stream`."""
    gen = stream(lm, prompt, **kwargs)
    gen.run()
    return Result(gen.results, gen.stats, gen.seed)


__all__ = ["load", "generate", "stream", "prepare", "settings_for", "Result", "GenkitError"]

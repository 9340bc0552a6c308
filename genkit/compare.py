"""Run one prompt through several presets (or --set variants) on one loaded model.

This is how a person learns what the decoding strategies do: the same model, the same prompt,
the answers side by side with each variant's settings and speed.
"""

from __future__ import annotations

from dataclasses import dataclass

from genkit import params as P
from genkit import presets as presets_mod
from genkit.errors import GenkitError


@dataclass
class Variant:
    label: str
    preset: presets_mod.Preset


@dataclass
class Row:
    label: str
    strategy: str
    settings: dict
    text: str
    finish_reason: str
    tokens: int
    tokens_per_s: float
    seconds: float


def variants(preset_names: list[str], set_variants: list[str], base: str | None, common: dict,
             vars: dict | None = None) -> list[Variant]:
    """Resolve every variant before the model loads, so a typo fails fast."""
    out = [Variant(name, presets_mod.resolve(name, None, common, vars)) for name in preset_names]
    for spec in set_variants:
        items = [s.strip() for s in spec.split(",") if s.strip()]
        overrides = P.merge(common, presets_mod.parse_set(items))
        out.append(Variant(spec, presets_mod.resolve(base, None, overrides, vars)))
    if not out:
        raise GenkitError("nothing to compare: pass --presets a,b,c and/or --variant key=value,...")
    return out


def check_prompts(todo: list[Variant], prompt: str) -> None:
    """Fill every variant's template now, so a missing variable fails before the model loads."""
    for v in todo:
        presets_mod.render_prompt(v.preset, prompt)


def run_variant(lm, v: Variant, prompt: str, *, system=None, raw=False, assistant=None) -> Row:
    from genkit.api import prepare

    gen = prepare(lm, v.preset, [prompt], system=system, raw=raw, assistant=assistant)
    settings = gen.settings
    results = gen.run()
    diff = presets_mod.diff_from_defaults(settings.explicit)
    if settings.do_sample:
        diff["seed"] = gen.seed
    return Row(
        label=v.label, strategy=settings.strategy, settings=diff,
        text=results[0].text, finish_reason=results[0].finish_reason,
        tokens=gen.stats.completion_tokens, tokens_per_s=round(gen.stats.tokens_per_s, 2),
        seconds=round(gen.stats.elapsed_s, 3),
    )

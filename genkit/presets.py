"""Named YAML presets, resolved into the generation settings of one request.

A preset file looks like this (every key optional):

    description: Sampling for stories and brainstorming
    extends: greedy                 # start from another preset
    system: You are a playful storyteller.
    template: "Translate to {target}: {prompt}"
    vars: {target: French}          # defaults for the template's variables
    generation:                     # generation parameters (see genkit/params.py)
      do_sample: true
      temperature: 0.8

Resolution, lowest first: the model's generation config < the preset (after its `extends`
chain) < a `--generation-config` file < flags. Everything here runs without torch.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genkit import params as P
from genkit import errors, paths, utf8
from genkit.errors import GenkitError, did_you_mean

PRESET_KEYS = {"description", "extends", "system", "template", "vars", "generation"}

# Keys a saved GenerationConfig file carries that are bookkeeping, not settings genkit uses.
IGNORED_CONFIG_KEYS = {
    "transformers_version", "_from_model_config", "use_cache", "return_dict_in_generate",
    "output_scores", "output_logits", "output_attentions", "output_hidden_states", "max_length",
    "min_length", "cache_implementation",
}


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load without aliases: `*a` repeats a node, and nested repeats grow
    exponentially (a 523-byte file took 2.4 GB). genkit's files never need them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in genkit's files: write the value out", mark)
        return super().compose_node(parent, index)


def load_yaml(text: str):
    """A YAML document as plain data, refusing aliases (see _NoAliasLoader)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class Preset:
    name: str
    source: str = "built-in"
    description: str = ""
    system: str | None = None
    template: str | None = None
    vars: dict[str, str] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)

    @property
    def strategy(self) -> str:
        return P.strategy_of(self.generation)


def _is_path(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml")) or "/" in ref


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a BOM allowed), or one line that says what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GenkitError(f"cannot read {what} {path}: {e.strerror}") from None
    return utf8.decode(data, f"{what} {path}", "save the file as UTF-8")


def _preset_files() -> dict[str, Path]:
    """Every named preset, user presets shadowing built-in ones of the same name."""
    found: dict[str, Path] = {}
    for folder in (paths.builtin_presets_dir(), paths.user_presets_dir()):
        if folder.is_dir():
            for f in sorted(folder.glob("*.y*ml")):
                found[f.stem] = f
    return found


def available() -> dict[str, Path]:
    return _preset_files()


def _read_yaml(path: Path) -> dict:
    text = read_text(path, "preset file")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GenkitError(f"{path}:{at}: malformed YAML: {problem}; fix the file's syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GenkitError(f"{path}: a preset must be a YAML mapping of keys (description, generation, ...)")
    return data


def _parse(name: str, path: Path, data: dict) -> tuple[Preset, str | None]:
    where = str(path)
    for key in data:
        if key not in PRESET_KEYS:
            hint = did_you_mean(str(key), PRESET_KEYS)
            if str(key) in P.PARAMS or str(key) in P.ALIASES:
                hint = " (generation parameters go under 'generation:')"
            raise GenkitError(f"{where}: unknown preset key '{key}'{hint}")
    for key in ("description", "system", "template", "extends"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise GenkitError(f"{where}: '{key}' must be a string")
    vars_ = data.get("vars") or {}
    if not isinstance(vars_, dict):
        raise GenkitError(f"{where}: 'vars' must be a mapping of name: default value")
    template = data.get("template")
    if template is not None:
        _template_fields(template, where)
    preset = Preset(
        name=name,
        source=where,
        description=data.get("description") or "",
        system=data.get("system"),
        template=template,
        vars={str(k): str(v) for k, v in vars_.items()},
        generation=P.check_params(data.get("generation") or {}, f"{where}: generation"),
    )
    return preset, data.get("extends")


def _template_fields(template: str, where: str) -> list[str]:
    """The variables a template names. Only plain `{name}` fields are allowed: a positional
    `{}`, an attribute or index (`{prompt.x}`), a conversion (`{prompt!r}`) or a format spec
    (`{prompt:>99999999}`) would fail, or allocate without bound, only when the prompt is filled in."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as e:
        raise GenkitError(f"{where}: bad template: {e} (write {{{{ and }}}} for literal braces)") from None
    names = []
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise GenkitError(f"{where}: template field {errors.shorten(shown)} is not a plain {{name}}: use "
                              "{prompt} or a variable's name, and {{ and }} for literal braces")
        names.append(name)
    return names


def load(ref: str) -> Preset:
    """A preset by name or by path, with its `extends` chain merged in."""
    chain: list[str] = []
    merged: Preset | None = None
    layers: list[Preset] = []
    current: str | None = ref
    while current is not None:
        if current in chain:
            raise GenkitError(f"preset '{ref}': 'extends' forms a cycle: {' -> '.join(chain + [current])}")
        chain.append(current)
        preset, parent = _load_one(current)
        layers.append(preset)
        current = parent
    for layer in reversed(layers):
        merged = layer if merged is None else _overlay(merged, layer)
    assert merged is not None
    merged.name, merged.source = layers[0].name, layers[0].source
    P.check_combination(merged.generation, f"preset '{merged.name}' ({merged.source})")
    return merged


def _load_one(ref: str) -> tuple[Preset, str | None]:
    if _is_path(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise GenkitError(f"preset file {ref} does not exist; pass a preset name or an existing YAML file")
        return _parse(path.stem, path, _read_yaml(path))
    files = _preset_files()
    if ref not in files:
        names = ", ".join(sorted(files))
        raise GenkitError(f"unknown preset '{ref}'{did_you_mean(ref, files)}; available: {names}")
    return _parse(ref, files[ref], _read_yaml(files[ref]))


def _overlay(base: Preset, top: Preset) -> Preset:
    return Preset(
        name=top.name,
        source=top.source,
        description=top.description or base.description,
        system=top.system if top.system is not None else base.system,
        template=top.template if top.template is not None else base.template,
        vars={**base.vars, **top.vars},
        generation=P.merge(base.generation, top.generation),
    )


def read_generation_config(path: str) -> dict:
    """Parameters from a saved GenerationConfig (JSON) or a YAML mapping of parameters."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "generation_config.json"
    if not p.is_file():
        raise GenkitError(f"generation config {path} does not exist; pass a .json or .yaml file")
    text = read_text(p, "generation config")
    try:
        data = json.loads(text) if p.suffix == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise GenkitError(f"{p}: malformed generation config: {errors.shorten(str(e).splitlines()[0])}") from None
    if not isinstance(data, dict):
        raise GenkitError(f"{p}: a generation config must be a mapping of parameter: value")
    data = {k: v for k, v in data.items() if k not in IGNORED_CONFIG_KEYS}
    if "seeding_scheme" in (data.get("watermarking_config") or {}):
        wm = data["watermarking_config"]
        data["watermarking_config"] = {k: wm[k] for k in P.WATERMARK_KEYS if k in wm}
    return P.check_params(data, str(p))


def parse_set(items: list[str]) -> dict:
    """`--set key=value` items; values are YAML scalars or lists (`--set dola_layers=[28,30]`)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GenkitError(f"--set {errors.shown(item)}: expected key=value, e.g. --set repetition_penalty=1.2")
        kind = P.PARAMS.get(P.ALIASES.get(key, key))
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            value = None if not kind or not kind.kind.startswith("str") else raw
            if value is None:
                problem = getattr(e, "problem", None) or "not YAML"
                raise GenkitError(f"--set {errors.shown(item)}: cannot read the value ({problem})") from None
        # Text parameters take the text as typed ('###' is a YAML comment, '1' a number).
        if kind and kind.kind.startswith("str") and raw and not isinstance(value, list):
            value = raw
        if value is None:
            raise GenkitError(f"--set {errors.shown(item)}: missing value after '='")
        k, v = P.check_param(key, value, f"--set {key}")
        out[k] = v
    return out


def parse_vars(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GenkitError(f"--var {errors.shown(item)}: expected name=value, e.g. --var target=French")
        out[key.strip()] = value
    return out


def resolve(
    preset: str | None = None,
    generation_config: str | None = None,
    overrides: dict | None = None,
    vars: dict | None = None,
) -> Preset:
    """The settings of one request: preset < generation config file < overrides (flags)."""
    base = load(preset) if preset else Preset(name="default", source="defaults")
    gen = dict(base.generation)
    if generation_config:
        gen = P.merge(gen, read_generation_config(generation_config))
    gen = P.merge(gen, overrides or {})
    where = f"preset '{base.name}'" if not overrides and not generation_config else "settings"
    P.check_combination(gen, where)
    _check_vars(base, vars or {})
    return Preset(
        name=base.name,
        source=base.source,
        description=base.description,
        system=base.system,
        template=base.template,
        vars={**base.vars, **(vars or {})},
        generation=gen,
    )


def _check_vars(preset: Preset, vars: dict) -> None:
    """A variable the preset's template does not use is a mistake (a typo, or the wrong
    preset), not something to ignore."""
    if not vars:
        return
    name = next(iter(vars))
    if not preset.template:
        what = "no preset was given" if preset.source == "defaults" else f"preset '{preset.name}' has no template"
        raise GenkitError(f"--var {name}: {what}, so there is nothing to fill; use a preset with a template "
                          "(e.g. --preset translate) or drop --var")
    fields = [f for f in _template_fields(preset.template, preset.source) if f and f != "prompt"]
    for key in vars:
        if key not in fields:
            takes = ", ".join(fields) if fields else "no variables besides the prompt"
            raise GenkitError(f"--var {key}: preset '{preset.name}' has no template variable '{key}'"
                              f"{did_you_mean(key, fields)}; its template takes: {takes}")


def render_prompt(preset: Preset, prompt: str) -> str:
    """Fill the preset's template (if any) with the prompt and the variables."""
    if not preset.template:
        return prompt
    values = {**preset.vars, "prompt": prompt}
    missing = [f for f in _template_fields(preset.template, preset.source) if f and f not in values]
    if missing:
        raise GenkitError(
            f"preset '{preset.name}': template needs variable '{missing[0]}': pass --var {missing[0]}=VALUE"
        )
    return preset.template.format_map(values)


def diff_from_defaults(generation: dict) -> dict:
    """Only the parameters that differ from the defaults, as the docs print a GenerationConfig."""
    return {k: v for k, v in generation.items() if v is not None and v != P.PARAMS[k].default}

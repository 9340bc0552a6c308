"""`genkit run`: one prompt, streamed."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from genkit.cli import options as o

G = o.GEN_PANEL


def register(app: typer.Typer) -> None:
    app.command("run")(run)


def run(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; '-' or a pipe reads stdin.")] = None,
    preset: o.Preset = None,
    model: o.Model = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt for chat models.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the text as it is, without the chat template.")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", rich_help_panel=G)] = None,
    min_new_tokens: Annotated[Optional[int], typer.Option("--min-new-tokens", rich_help_panel=G)] = None,
    sample: Annotated[Optional[bool], typer.Option(
        "--sample/--greedy", rich_help_panel=G, help="Sample, or always take the most likely token.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", rich_help_panel=G)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", rich_help_panel=G)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", rich_help_panel=G)] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", rich_help_panel=G)] = None,
    typical_p: Annotated[Optional[float], typer.Option("--typical-p", rich_help_panel=G)] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", rich_help_panel=G)] = None,
    no_repeat_ngram_size: Annotated[Optional[int], typer.Option("--no-repeat-ngram-size", rich_help_panel=G)] = None,
    num_beams: Annotated[Optional[int], typer.Option("--num-beams", rich_help_panel=G)] = None,
    num_beam_groups: Annotated[Optional[int], typer.Option("--num-beam-groups", rich_help_panel=G)] = None,
    diversity_penalty: Annotated[Optional[float], typer.Option("--diversity-penalty", rich_help_panel=G)] = None,
    length_penalty: Annotated[Optional[float], typer.Option("--length-penalty", rich_help_panel=G)] = None,
    penalty_alpha: Annotated[Optional[float], typer.Option("--penalty-alpha", rich_help_panel=G)] = None,
    dola_layers: Annotated[Optional[str], typer.Option(
        "--dola-layers", rich_help_panel=G, help="low, high or comma-separated layer indices.")] = None,
    prompt_lookup: Annotated[Optional[int], typer.Option(
        "--prompt-lookup-num-tokens", rich_help_panel=G, help="Prompt-lookup decoding draft length.")] = None,
    assistant_model: Annotated[Optional[str], typer.Option(
        "--assistant-model", rich_help_panel=G, help="Draft model for assisted decoding.")] = None,
    num_return_sequences: Annotated[Optional[int], typer.Option(
        "--num-return-sequences", rich_help_panel=G, help="Sequences to return.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", rich_help_panel=G, help="Seed for reproducible sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        "--stop", rich_help_panel=G,
        help="Stop string (repeatable), cut from the text; \\n, \\t, \\r and \\\\ are escapes: --stop '\\n\\n' "
             "stops at a blank line.")] = None,
    max_time: Annotated[Optional[float], typer.Option("--max-time", rich_help_panel=G, help="Seconds.")] = None,
    watermark: Annotated[bool, typer.Option("--watermark", rich_help_panel=G, help="Watermark the text.")] = False,
    generation_config: o.GenConfig = None,
    set_: o.Set = None,
    var: o.Var = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print a summary line on stderr.")] = False,
    logprobs: Annotated[bool, typer.Option("--logprobs", help="Include token log-probabilities in --json.")] = False,
    dtype: o.Dtype = "auto",
    device_map: o.DeviceMap = None,
    load_in_4bit: o.Load4 = False,
    load_in_8bit: o.Load8 = False,
    quant_type: o.QuantType = "nf4",
    compute_dtype: o.ComputeDtype = None,
    trust_remote_code: o.TrustRemote = False,
    native_4bit: o.Native4 = False,
    native_8bit: o.Native8 = False,
    int8_activations: o.Int8Activations = False,
) -> None:
    """Generate from one prompt and stream the answer."""
    from genkit import params as P
    from genkit import presets

    # Everything the user typed is checked before the model loads.
    flags = {
        "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "do_sample": sample,
        "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p, "typical_p": typical_p,
        "repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
        "num_beams": num_beams, "num_beam_groups": num_beam_groups, "diversity_penalty": diversity_penalty,
        "length_penalty": length_penalty, "penalty_alpha": penalty_alpha,
        "dola_layers": _dola_flag(dola_layers), "prompt_lookup_num_tokens": prompt_lookup,
        "assistant_model": assistant_model, "num_return_sequences": num_return_sequences, "seed": seed,
        "stop_strings": [o.unescape(s) for s in stop] if stop else None, "max_time": max_time, "watermark": {} if watermark else None,
    }
    overrides = {}
    for key, value in flags.items():
        if value is not None:
            k, v = P.check_param(key, value, "--" + key.replace("_", "-"))
            overrides[k] = v
    overrides.update(presets.parse_set(set_ or []))
    resolved = presets.resolve(preset, generation_config, overrides, presets.parse_vars(var or []))
    text = presets.render_prompt(resolved, o.prompt_from(prompt))
    opts = o.load_options(dtype, device_map, load_in_4bit, load_in_8bit, quant_type, compute_dtype, trust_remote_code,
                          native_4bit, native_8bit, int8_activations)

    lm = o.load_model(model, opts)
    _generate(lm, resolved, text, system, raw, json_out, stats, logprobs)


def _dola_flag(value: Optional[str]):
    if value is None or value in ("low", "high"):
        return value
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        from genkit.errors import GenkitError

        raise GenkitError(f"--dola-layers {value!r}: expected low, high or layer indices like 28,30") from None


def _generate(lm, resolved, text, system, raw, json_out, want_stats, logprobs) -> None:
    from rich.console import Console

    from genkit import presets, render
    from genkit.engine.settings import build
    from genkit.engine import Generation

    settings = build(lm, resolved.generation)
    assistant = None
    if settings.assistant_model:
        assistant = o.load_model(settings.assistant_model, _assistant_options(lm))
    gen = Generation(
        lm, [text], settings, system=system if system is not None else resolved.system, raw=raw,
        logprobs=logprobs, assistant=assistant,
    )
    err = Console(stderr=True, highlight=False)
    if settings.strategy in ("beam", "beam-sampling", "diverse-beam") and err.is_terminal and not json_out:
        err.print(f"[dim]{settings.strategy}: the text appears once the search has finished[/dim]")
    interrupted = False
    try:
        if json_out:
            gen.run()
        else:
            with render.TextView(settings.num_return_sequences) as view:
                for ev in gen:
                    view.event(ev)
    except KeyboardInterrupt:
        interrupted = True
    if json_out:
        diff = presets.diff_from_defaults(settings.explicit)
        diff["max_new_tokens"] = settings.max_new_tokens
        print(render.json_record(gen, model_name=lm.name, preset=resolved, prompt=text, settings_diff=diff))
    if want_stats or interrupted:
        reasons = [r.finish_reason for r in gen.results] or ["cancelled"]
        print(render.stats_line(gen.stats, reasons), file=sys.stderr)
    if interrupted:
        raise SystemExit(130)


def _assistant_options(lm):
    from genkit.models import LoadOptions

    return LoadOptions(dtype=str(lm.model.dtype).replace("torch.", ""))

"""`genkit run`: one prompt, streamed."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from genkit.cli import options as o

G = o.GEN_PANEL


def _complete_cids() -> list[str]:
    """Shell completion of --cid: the latest logged conversations."""
    from genkit.cli.logs_cmd import _ids

    return _ids()


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
    no_log: Annotated[bool, typer.Option(
        "--no-log", help="Do not log this to genkit's SQLite log (`genkit logs off`: never).")] = False,
    continue_: Annotated[bool, typer.Option(
        "--continue", "-c", help="Continue the latest logged conversation (`genkit logs list`).")] = False,
    cid: Annotated[Optional[str], typer.Option(
        "--cid", help="Continue the logged conversation with this id.", autocompletion=_complete_cids)] = None,
) -> None:
    """Generate from one prompt and stream the answer."""
    from genkit import presets

    # Everything the user typed is checked before the model loads.
    args = locals()
    resolved = presets.resolve(preset, generation_config, generation_overrides(args), presets.parse_vars(var or []))
    text = presets.render_prompt(resolved, o.prompt_from(prompt))
    opts = load_options(args)
    conversation_id, history, logged_system = continued_conversation(args)
    if system is None:
        system = logged_system

    lm = o.load_model(model, opts)
    _generate(lm, resolved, text, system, raw, json_out, stats, logprobs, history=history,
              log_to=None if no_log else conversation_id)


def continued_conversation(a: dict):
    """(conversation id to log to, earlier messages, its system prompt) for -c / --cid; a new id
    and no history otherwise. The id is None when logging is off."""
    from genkit import logs

    history, system, cid = [], None, None
    if a["continue_"] or a["cid"]:
        cid, rows = logs.find_conversation(a["cid"])
        history = logs.messages_of(rows)
        system = rows[-1]["system"] if rows else None
    if a["no_log"] or not logs.enabled():
        return None, history, system
    return cid or logs.new_conversation_id(), history, system


def generation_overrides(a: dict) -> dict:
    """The generation parameters set by run's flags (shared with `genkit chat`), checked."""
    from genkit import params as P
    from genkit import presets

    flags = {
        "max_new_tokens": a["max_new_tokens"], "min_new_tokens": a["min_new_tokens"], "do_sample": a["sample"],
        "temperature": a["temperature"], "top_k": a["top_k"], "top_p": a["top_p"], "min_p": a["min_p"],
        "typical_p": a["typical_p"], "repetition_penalty": a["repetition_penalty"],
        "no_repeat_ngram_size": a["no_repeat_ngram_size"], "num_beams": a["num_beams"],
        "num_beam_groups": a["num_beam_groups"], "diversity_penalty": a["diversity_penalty"],
        "length_penalty": a["length_penalty"], "penalty_alpha": a["penalty_alpha"],
        "dola_layers": _dola_flag(a["dola_layers"]), "prompt_lookup_num_tokens": a["prompt_lookup"],
        "assistant_model": a["assistant_model"], "num_return_sequences": a["num_return_sequences"],
        "seed": a["seed"], "stop_strings": [o.unescape(x) for x in a["stop"]] if a["stop"] else None, "max_time": a["max_time"],
        "watermark": {} if a["watermark"] else None,
    }
    overrides = {}
    for key, value in flags.items():
        if value is not None:
            k, v = P.check_param(key, value, "--" + key.replace("_", "-"))
            overrides[k] = v
    overrides.update(presets.parse_set(a["set_"] or []))
    return overrides


def load_options(a: dict):
    """The model loading options of run's flags (shared with `genkit chat`)."""
    return o.load_options(a["dtype"], a["device_map"], a["load_in_4bit"], a["load_in_8bit"], a["quant_type"],
                          a["compute_dtype"], a["trust_remote_code"], a["native_4bit"], a["native_8bit"],
                          a["int8_activations"])


def _dola_flag(value: Optional[str]):
    if value is None or value in ("low", "high"):
        return value
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        from genkit.errors import GenkitError

        raise GenkitError(f"--dola-layers {value!r}: expected low, high or layer indices like 28,30") from None


def _generate(lm, resolved, text, system, raw, json_out, want_stats, logprobs, *, history=(), log_to=None) -> None:
    from rich.console import Console

    from genkit import presets, render
    from genkit.engine.settings import build
    from genkit.engine import Generation

    settings = build(lm, resolved.generation)
    assistant = None
    if settings.assistant_model:
        assistant = o.load_model(settings.assistant_model, _assistant_options(lm))
    system = system if system is not None else resolved.system
    prompt = [*history, {"role": "user", "content": text}] if history else text
    gen = Generation(lm, [prompt], settings, system=system, raw=raw, logprobs=logprobs, assistant=assistant)
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
    diff = presets.diff_from_defaults(settings.explicit)
    diff["max_new_tokens"] = settings.max_new_tokens
    if log_to is not None:
        from genkit import logs

        logs.record_generation(log_to, "run", gen, model=lm.name, preset=resolved.name, system=system,
                               history=list(history), prompt=text, settings=diff)
    if json_out:
        print(render.json_record(gen, model_name=lm.name, preset=resolved, prompt=text, settings_diff=diff))
    if want_stats or interrupted:
        reasons = [r.finish_reason for r in gen.results] or ["cancelled"]
        print(render.stats_line(gen.stats, reasons), file=sys.stderr)
    if interrupted:
        raise SystemExit(130)


def _assistant_options(lm):
    from genkit.models import LoadOptions

    return LoadOptions(dtype=str(lm.model.dtype).replace("torch.", ""))

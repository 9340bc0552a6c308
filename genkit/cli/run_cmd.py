"""`genkit run`: one prompt, streamed."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from genkit.cli import constraint_opts as c
from genkit.cli import options as o
from genkit.models import LoadOptions

G = o.GEN_PANEL


def _complete_cids() -> list[str]:
    """Shell completion of --cid: the latest logged conversations."""
    from genkit.cli.logs_cmd import _ids

    return _ids()


def register(app: typer.Typer) -> None:
    app.command("run")(run)


@o.model_options
@c.constraint_options
def run(
    prompt: o.Prompt = None,
    preset: o.Preset = None,
    model: o.Model = None,
    system: o.System = None,
    raw: o.Raw = False,
    max_new_tokens: o.MaxNewTokens = None,
    min_new_tokens: Annotated[Optional[int], o.gen_option("min_new_tokens", default="0")] = None,
    sample: o.Sample = None,
    temperature: o.Temperature = None,
    top_k: Annotated[Optional[int], o.gen_option("top_k")] = None,
    top_p: Annotated[Optional[float], o.gen_option("top_p")] = None,
    min_p: Annotated[Optional[float], o.gen_option("min_p")] = None,
    typical_p: Annotated[Optional[float], o.gen_option("typical_p")] = None,
    repetition_penalty: Annotated[Optional[float], o.gen_option("repetition_penalty")] = None,
    no_repeat_ngram_size: Annotated[Optional[int], o.gen_option("no_repeat_ngram_size")] = None,
    num_beams: Annotated[Optional[int], o.gen_option("num_beams")] = None,
    num_beam_groups: Annotated[Optional[int], o.gen_option("num_beam_groups")] = None,
    diversity_penalty: Annotated[Optional[float], o.gen_option("diversity_penalty")] = None,
    length_penalty: Annotated[Optional[float], o.gen_option("length_penalty")] = None,
    penalty_alpha: Annotated[Optional[float], o.gen_option(
        "penalty_alpha", help="Degeneration penalty of contrastive search (with --top-k).")] = None,
    dola_layers: Annotated[Optional[str], o.gen_option(
        "dola_layers", help="DoLa: low, high or comma-separated layer indices.")] = None,
    prompt_lookup: Annotated[Optional[int], o.gen_option(
        "prompt_lookup_num_tokens", help="Prompt-lookup decoding: draft tokens per step.")] = None,
    assistant_model: Annotated[Optional[str], o.gen_option(
        "assistant_model", help="Draft model for assisted decoding (same tokenizer).")] = None,
    num_return_sequences: Annotated[Optional[int], o.gen_option("num_return_sequences")] = None,
    seed: o.Seed = None,
    stop: Annotated[Optional[list[str]], o.gen_option(
        "stop_strings", "--stop",
        help="Stop string, cut from the text (repeatable); \\n, \\t, \\r and \\\\ are escapes: --stop '\\n\\n' "
             "stops at a blank line.")] = None,
    max_time: Annotated[Optional[float], o.gen_option(
        "max_time", help="Seconds after which generation stops.")] = None,
    watermark: Annotated[bool, o.gen_option(
        "watermark", help="Watermark the text (`genkit detect` finds it).", default="off")] = False,
    generation_config: o.GenConfig = None,
    set_: o.Set = None,
    var: o.Var = None,
    constraints: Optional[dict] = None,  # the "Structured output" flags: constraint_options
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print a summary line on stderr.")] = False,
    logprobs: Annotated[Optional[int], typer.Option(
        "--logprobs", metavar="N", min=0, max=20,
        help="With --json: each token's log-probability and its N (0-20) most likely alternatives (default: none).")] = None,
    no_log: Annotated[bool, typer.Option(
        "--no-log", help="Do not log this to genkit's SQLite log (`genkit logs off`: never).")] = False,
    continue_: Annotated[bool, typer.Option(
        "--continue", "-c", help="Continue the latest logged conversation (`genkit logs list`).")] = False,
    cid: Annotated[Optional[str], typer.Option(
        "--cid", autocompletion=_complete_cids, show_default=False,
        help=o.with_default("Continue the logged conversation with this id.", "a new conversation"))] = None,
    load: LoadOptions = None,
) -> None:
    """Generate from one prompt and stream the answer."""
    from genkit import presets

    # Everything the user typed is checked before the model loads.
    args = locals()
    resolved = presets.resolve(preset, generation_config, generation_overrides(args), presets.parse_vars(var or []))
    asked = o.prompt_from(prompt)
    presets.render_prompt(resolved, asked)  # a template's missing variable fails before the model loads
    conversation_id, history, logged_system = continued_conversation(args)
    if system is None:
        system = logged_system

    lm = o.load_model(model, load)
    _generate(lm, resolved, asked, system, raw, json_out, stats, logprobs, history=history,
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
    return P.merge(overrides, a["constraints"])


def load_options(a: dict):
    """The model loading options of run's flags (shared with `genkit chat`, whose signature is
    run's: it receives the loading flags one by one)."""
    return o.load_options(a)


def _dola_flag(value: Optional[str]):
    if value is None or value in ("low", "high"):
        return value
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        from genkit.errors import GenkitError

        raise GenkitError(f"--dola-layers {value!r}: expected low, high or layer indices like 28,30") from None


def _generate(lm, resolved, asked, system, raw, json_out, want_stats, logprobs, *, history=(), log_to=None) -> None:
    from rich.console import Console

    from genkit import presets, render
    from genkit.api import prepare
    from genkit.engine import strategies

    text = presets.render_prompt(resolved, asked)  # what the user asked, as logged and reported
    # A continued conversation's messages are taken as they are: the new one joins them rendered.
    prompt = [*history, {"role": "user", "content": text}] if history else asked
    gen = prepare(lm, resolved, [prompt], system=system, raw=raw, logprobs=logprobs)
    settings, system = gen.settings, gen.system
    err = Console(stderr=True, highlight=False)
    if strategies.get(settings.strategy).beams and err.is_terminal and not json_out:
        err.print(f"[dim]{settings.strategy}: the text appears once the search has finished[/dim]")
    interrupted = False
    events = iter(gen)
    try:
        if json_out:
            gen.run()
        else:
            with render.TextView(settings.num_return_sequences) as view:
                for ev in events:
                    view.event(ev)
    except KeyboardInterrupt:
        interrupted = True
        # Ctrl-C may land while a token is being shown, outside the engine: closing the
        # events lets it end every sequence as cancelled, so the log and stats keep the text.
        events.close()
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



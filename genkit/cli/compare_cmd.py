"""`genkit compare`: one prompt, several presets, answers side by side."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from genkit.cli import options as o


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)


def compare(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; '-' or a pipe reads stdin.")] = None,
    presets_: Annotated[str, typer.Option(
        "--presets", help="Comma-separated presets, e.g. greedy,creative,contrastive,factual-dola.")] = "",
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", help="A --set variant of --preset: 'temperature=0.3,top_p=0.9' (repeatable).")] = None,
    preset: o.Preset = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="For every variant.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for every sampling variant.")] = None,
    system: Annotated[Optional[str], typer.Option("--system")] = None,
    raw: Annotated[bool, typer.Option("--raw")] = False,
    var: o.Var = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per variant (the default when piped).")] = False,
    model: o.Model = None,
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
    """Run one prompt through several presets on one loaded model and show the answers side by side."""
    from rich.console import Console

    from genkit import compare as cmp

    common = {k: v for k, v in {"max_new_tokens": max_new_tokens, "seed": seed}.items() if v is not None}
    names = [p.strip() for p in presets_.split(",") if p.strip()]
    from genkit import presets

    todo = cmp.variants(names, variant or [], preset, common, presets.parse_vars(var or []))
    text = o.prompt_from(prompt)
    cmp.check_prompts(todo, text)  # a template's missing variable fails before the model loads
    opts = o.load_options(dtype, device_map, load_in_4bit, load_in_8bit, quant_type, compute_dtype, trust_remote_code,
                          native_4bit, native_8bit, int8_activations)
    out = Console(highlight=False)
    as_json = json_out or not out.is_terminal
    lm = o.load_model(model, opts)
    err = Console(stderr=True)
    rows = []
    for i, v in enumerate(todo, 1):
        if err.is_terminal:
            with err.status(f"{v.label} ({i}/{len(todo)})…"):
                row = cmp.run_variant(lm, v, text, system=system, raw=raw)
        else:
            row = cmp.run_variant(lm, v, text, system=system, raw=raw)
        rows.append(row)
        if as_json:
            print(json.dumps(asdict(row), ensure_ascii=False), flush=True)
    if not as_json:
        _show(out, rows)


def _show(console, rows) -> None:
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.text import Text

    width = max(30, console.width // min(len(rows), 3) - 2)
    panels = []
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items() if k != "seed")
        body = Text(r.text or "(empty)")
        body.append(f"\n\n{settings}", style="dim")
        # Speed and finish reason inside the panel: a subtitle gets cut in narrow columns.
        body.append(f"\n{r.tokens} tokens · {r.tokens_per_s:.1f} tok/s · {r.finish_reason}", style="dim cyan")
        panels.append(Panel(body, width=width, title=f"[bold]{r.label}[/bold] · {r.strategy}", title_align="left"))
    console.print(Columns(panels, equal=True))

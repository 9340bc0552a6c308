"""`genkit compare`: one prompt, several presets, answers side by side."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from genkit.cli import constraint_opts as c
from genkit.cli import options as o
from genkit.models import LoadOptions


@o.model_options
@c.constraint_options
def compare(
    prompt: o.Prompt = None,
    presets_: Annotated[str, typer.Option(
        "--presets", show_default=False,
        help=o.with_default("Comma-separated presets, e.g. greedy,creative,contrastive,factual-dola.", "none"))] = "",
    variant: Annotated[Optional[list[str]], typer.Option(
        "--variant", show_default=False,
        help=o.with_default("A --set variant of --preset: 'temperature=0.3,top_p=0.9' (repeatable).", "none"))] = None,
    preset: o.Preset = None,
    max_new_tokens: Annotated[Optional[int], o.gen_option(
        "max_new_tokens", "--max-new-tokens", "-n", help="Most new tokens, for every variant.",
        default="each preset's, else 256")] = None,
    seed: Annotated[Optional[int], o.gen_option(
        "seed", help="Seed for every sampling variant.", default="random")] = None,
    system: o.System = None,
    raw: o.Raw = False,
    var: o.Var = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="One JSON line per variant (the default when piped).")] = False,
    constraints: Optional[dict] = None,  # the "Structured output" flags: constraint_options
    model: o.Model = None,
    load: LoadOptions = None,
) -> None:
    """Run one prompt through several presets on one loaded model and show the answers side by side."""
    from rich.console import Console

    from genkit import compare as cmp

    common = {k: v for k, v in {"max_new_tokens": max_new_tokens, "seed": seed}.items() if v is not None}
    common.update(constraints)
    names = [p.strip() for p in presets_.split(",") if p.strip()]
    from genkit import presets

    todo = cmp.variants(names, variant or [], preset, common, presets.parse_vars(var or []))
    text = o.prompt_from(prompt, "compare")
    cmp.check_prompts(todo, text)  # a template's missing variable fails before the model loads
    out = Console(highlight=False)
    as_json = json_out or not out.is_terminal
    lm = o.load_model(model, load)
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

    from genkit.render import count

    width = max(30, console.width // min(len(rows), 3) - 2)
    panels = []
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items() if k != "seed")
        body = Text(r.text or "(empty)")
        body.append(f"\n\n{settings}", style="dim")
        # Speed and finish reason inside the panel: a subtitle gets cut in narrow columns.
        body.append(f"\n{count(r.tokens, 'token')} · {r.tokens_per_s:.1f} tok/s · {r.finish_reason}", style="dim cyan")
        panels.append(Panel(body, width=width, title=f"[bold]{r.label}[/bold] · {r.strategy}", title_align="left"))
    console.print(Columns(panels, equal=True))


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)

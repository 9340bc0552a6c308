"""`genkit presets list|show|params`: no model, no torch."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from genkit.cli.groups import group


def register(app: typer.Typer) -> None:
    sub = group("List and inspect generation presets.")
    sub.command("list")(list_presets)
    sub.command("show")(show)
    sub.command("params")(params)
    app.add_typer(sub, name="presets")


def list_presets(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per preset.")] = False,
) -> None:
    """Every preset: name, strategy, description (user presets shadow built-ins)."""
    from rich.console import Console
    from rich.table import Table

    from genkit import paths, presets
    from genkit.errors import GenkitError

    rows = []
    for name, path in sorted(presets.available().items()):
        origin = "user" if path.parent == paths.user_presets_dir() else "built-in"
        try:
            p = presets.load(name)
        except GenkitError as e:  # one broken file must not hide the others
            rows.append({"name": name, "strategy": "-", "description": f"broken: {e.message}", "source": origin})
            continue
        rows.append({"name": name, "strategy": p.strategy, "description": p.description, "source": origin})
    if json_out:
        for r in rows:
            print(json.dumps(r))
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("name", "strategy", "description", "source"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["strategy"], r["description"], r["source"])
    Console(highlight=False).print(table)


def show(
    name: Annotated[str, typer.Argument(help="Preset name or YAML file.")],
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override: key=value.")] = [],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object instead of text.")] = False,
) -> None:
    """The resolved preset: only the settings that differ from the defaults."""
    from genkit import presets

    p = presets.resolve(name, None, presets.parse_set(set_))
    diff = presets.diff_from_defaults(p.generation)
    if json_out:
        print(json.dumps({"name": p.name, "strategy": p.strategy, "description": p.description,
                          "source": p.source, "system": p.system, "template": p.template,
                          "vars": p.vars, "generation": diff}, ensure_ascii=False))
        return
    print(f"# {p.name} ({p.strategy}) — {p.description}" if p.description else f"# {p.name} ({p.strategy})")
    print(f"# from {p.source}")
    for key in ("system", "template"):
        if getattr(p, key):
            print(f"# {key}: {getattr(p, key)!r}")
    if p.vars:
        print(f"# vars: {json.dumps(p.vars, ensure_ascii=False)}")
    print("GenerationConfig " + json.dumps(diff, indent=2, sort_keys=True, ensure_ascii=False))


def params() -> None:
    """Every generation parameter genkit understands, with its default."""
    from genkit.params import DEFAULT_MAX_NEW_TOKENS, PARAMS

    # genkit's own default where transformers' would be none: max_new_tokens never falls back
    # to transformers' 20-token max_length
    applied = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
    width = max(len(n) for n in PARAMS)
    for p in PARAMS.values():
        print(f"{p.name:<{width}}  {str(applied.get(p.name, p.default)):<10}  {p.help}")

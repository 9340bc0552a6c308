"""`genkit models` (what is cached) and `genkit pull` (prepare the default model)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("models")(list_models)
    app.command("pull")(pull)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def list_models(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per model.")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Hash every file against its manifest (files unchanged since their last check are "
                        "otherwise trusted).")] = False,
) -> None:
    """Models in genkit's cache: name, source, size, state, and what each holds (a native GGUF
    entry: the file's architecture and tensor types)."""
    from rich.console import Console
    from rich.table import Table

    from genkit import models

    rows = models.cached_entries(full=check)
    if json_out:
        for r in rows:
            print(json.dumps(r))
        return
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=1000)  # piped: whole paths, not cut to 80 columns
    if not rows:
        console.print(f"no cached models in {models.models_dir()} (run `genkit pull`)")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("name", "source", "size", "state", "holds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["source"], _size(r["size"]), r["state"], _holds(r))
    console.print(table)


def _holds(row: dict) -> str:
    """A native GGUF entry: the file's architecture and tensor types; a converted one: float weights."""
    if "architecture" not in row:
        return "transformers weights"
    types = ", ".join(f"{kind} x{n}" for kind, n in row["types"].items())
    return f"{row['architecture']} GGUF, run natively: {types}"


def pull(
    model: Annotated[Optional[str], typer.Argument(help="A .gguf file to convert (default: the embedded model).")] = None,
) -> None:
    """Convert the embedded default model (or a GGUF file) into genkit's cache ahead of time."""
    from pathlib import Path

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from genkit import models
    from genkit.errors import GenkitError

    if model is not None and not model.endswith(".gguf"):
        raise GenkitError(f"genkit pull converts .gguf files; {model} is loaded as it is by --model")
    gguf = Path(model) if model else models.default_gguf_path()
    if not gguf.is_file():
        raise GenkitError(f"GGUF file {model} does not exist; check the path")
    console = Console(stderr=True)
    steps = ["converting tokenizer", "dequantising weights", "writing safetensors"]
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task("checking cache", total=len(steps))

        def step(msg):  # the sub-steps in a terminal; genkit's log says the whole step anyway
            progress.update(task, description=msg, completed=steps.index(msg) if msg in steps else 0)

        try:
            entry = models.prepare_gguf(gguf, default=model is None, progress=step)
        except GenkitError:
            raise
        except Exception as e:
            raise models.load_error(str(gguf), e) from e
        # the first run's other slow step: a run right after `genkit pull` starts at once
        progress.update(task, description="checking genkit's CPU kernels", completed=len(steps))
        from genkit.native import kernels

        kernels.available()
        progress.update(task, description="ready", completed=len(steps))
    print(entry)

"""`genkit config save`: a preset as a GenerationConfig file beside a model (several per model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genkit.cli.groups import group

from genkit.cli import options as o


def register(app: typer.Typer) -> None:
    sub = group("Save generation configs with a model.")
    sub.command("save")(save)
    app.add_typer(sub, name="config")


def save(
    directory: Annotated[str, typer.Argument(help="Model directory (or any directory) to write into.")],
    name: Annotated[str, typer.Option("--name", help="File name, e.g. creative.json.")] = "generation_config.json",
    preset: o.Preset = None,
    generation_config: o.GenConfig = None,
    set_: o.Set = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write the resolved settings as DIR/NAME, readable by GenerationConfig.from_pretrained(DIR, NAME)
    and by `genkit run --generation-config DIR/NAME`."""
    from genkit import presets
    from genkit.errors import GenkitError

    resolved = presets.resolve(preset, generation_config, presets.parse_set(set_ or []))
    if not name.endswith(".json"):
        raise GenkitError(f"--name {name}: a generation config file name ends in .json")
    if Path(name).name != name or name.startswith("."):
        raise GenkitError(f"--name {name}: a plain file name (no directory, no leading dot) that is written "
                          "inside DIRECTORY; put the directory in the argument instead")
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise GenkitError(f"{directory} is not a directory")
    out = target / name
    if out.exists() and not force:
        raise GenkitError(f"{out} already exists: pass --force to overwrite it")
    from genkit.engine.settings import to_generation_config

    to_generation_config(resolved.generation).save_pretrained(str(target), config_file_name=name)
    print(out)

"""Sub-command groups (`genkit presets`, `genkit config`): called bare, they print their help
and exit 0, as `genkit` does; click's own no_args_is_help exits 2 as if it were a mistake."""

from __future__ import annotations

import typer


def group(help: str) -> typer.Typer:
    sub = typer.Typer(help=help)

    @sub.callback(invoke_without_command=True)
    def show_help(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:
            print(ctx.get_help())
            raise typer.Exit(0)

    show_help.__doc__ = help
    return sub

"""`genkit score`: the log-probability of each token of a text under a model, as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from genkit.cli import options as o
from genkit.errors import GenkitError
from genkit.models import LoadOptions


def register(app: typer.Typer) -> None:
    app.command("score")(score)


@o.model_options
def score(
    text: Annotated[Optional[str], typer.Argument(help="The text; '-' or a pipe reads stdin.")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Score this file's text, as one text (default: the argument or stdin).")] = None,
    model: o.Model = None,
    load: LoadOptions = None,
) -> None:
    """Score a text: each token's log-probability under the model, the total and the perplexity (JSON)."""
    if file is not None:
        if text is not None:
            raise GenkitError("give the text or --file, not both")
        try:
            content = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GenkitError(f"{file}: cannot read it: {e}") from None
    else:
        content = o.prompt_from(text)
    if not content.strip():
        raise GenkitError("the text is empty: give some text to score")
    from genkit import score as score_mod

    lm = o.load_model(model, load)
    print(json.dumps(score_mod.score(lm, content), ensure_ascii=False))

"""`genkit logs list|show|on|off|path`: the SQLite log of runs and chats. No model, no torch."""

from __future__ import annotations

import datetime
import json
from typing import Annotated

import typer

from genkit.errors import GenkitError


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="The log of every genkit run and chat (SQLite in genkit's data directory).",
                      no_args_is_help=True)
    sub.command("list")(list_logs)
    sub.command("show")(show)
    sub.command("off")(off)
    sub.command("on")(on)
    sub.command("path")(path)
    app.add_typer(sub, name="logs")


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str, width: int = 60) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def list_logs(
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="How many conversations, latest first.")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per conversation.")] = False,
) -> None:
    """The latest conversations: id, time, model, answers, first prompt."""
    from genkit import logs

    rows = logs.conversations(count)
    if json_out:
        for r in rows:
            print(json.dumps({k: r[k] for k in ("id", "started", "updated", "turns", "model", "first_prompt")},
                             ensure_ascii=False))
        return
    if not rows:
        print("no conversations logged yet", flush=True)
        return
    model_width = max(len(r["model"] or "-") for r in rows)
    print(f"{'id':17}  {'updated':19}  {'model':{model_width}}  answers  first prompt")
    for r in rows:
        print(f"{r['id']:17}  {_when(r['updated'])}  {r['model'] or '-':{model_width}}  {r['turns']:7}  "
              f"{_short(r['first_prompt'])}")


def show(
    conversation: Annotated[str, typer.Argument(help="A conversation id (or its first characters).",
                                                autocompletion=lambda: _ids())],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per answer.")] = False,
) -> None:
    """Every answer of a conversation with its prompt, settings, seed and timings."""
    from genkit import logs

    cid, rows = logs.find_conversation(conversation, "genkit logs show")
    if json_out:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        return
    print(f"conversation {cid}: {len(rows)} answer{'s' if len(rows) != 1 else ''}")
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r["settings"].items()))
        t = r["timings"]
        ttft = t.get("time_to_first_token_s")
        print(f"\n## {r['id']} · {_when(r['created'])} · genkit {r['command']} · {r['model']} · preset {r['preset']}")
        print(f"settings: {settings or '-'} · seed {r['seed']}")
        print(f"tokens: {r['prompt_tokens']} prompt, {r['completion_tokens']} answer · "
              f"{t.get('elapsed_s', 0):.2f} s · first token {'-' if ttft is None else f'{ttft:.2f} s'} · "
              f"finish: {r['finish_reason']}")
        if r["system"]:
            print(f"system: {r['system']}")
        print(f"\n> {r['prompt']}\n\n{r['answer']}")


def _ids() -> list[str]:
    from genkit import logs

    try:
        return [r["id"] for r in logs.conversations(50)]
    except GenkitError:
        return []


def off() -> None:
    """Stop logging runs and chats (GENKIT_LOG=0 does the same for one shell)."""
    from genkit import logs

    logs.set_enabled(False)
    print("logging is off")


def on() -> None:
    """Log runs and chats again."""
    from genkit import logs

    logs.set_enabled(True)
    print("logging is on" + ("" if logs.enabled() else " (but GENKIT_LOG=0 keeps it off in this shell)"))


def path() -> None:
    """Where the log is."""
    from genkit import logs

    print(logs.db_path())

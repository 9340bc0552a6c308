"""`genkit chat` in a terminal: readline editing and history, multi-line messages, answers
streamed live with Rich, Ctrl-C to stop an answer and Ctrl-D to leave."""

from __future__ import annotations

import sys

from rich.console import Console

from genkit import paths, render
from genkit.cli.chat_commands import BLOCK, run_command, stats_line
from genkit.errors import GenkitError

# readline counts the prompt's width: its escape codes go between \001 and \002.
PROMPT = "\001\033[1;32m\002>>> \001\033[0m\002"
MORE = "\001\033[2m\002... \001\033[0m\002"
HISTORY_LENGTH = 2000


def history_file():
    return paths.config_dir() / "chat_history"


def loop(session, args: dict) -> None:
    history = _start_readline()
    err = Console(stderr=True, highlight=False)
    err.print(f"[dim]genkit chat · {session.lm.name} · preset {session.resolved.name} "
              f"({session.settings.strategy}) · /help for commands, Ctrl-D to leave[/dim]")
    if session.messages:
        last = session.messages[-1]["content"]
        err.print(f"[dim]continuing a conversation of {len(session.messages)} messages; the last one:[/dim]")
        err.print(last, markup=False, highlight=False)
    try:
        while True:
            try:
                text = read_message()
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as shells do
                print(file=sys.stderr)
                continue
            if text is None:  # Ctrl-D
                print(file=sys.stderr)
                return
            if not text.strip():
                continue
            try:
                events = None if text.startswith("/") else session.ask(text)
                if events is None:
                    outcome = run_command(session, text, lambda line: err.print(line, markup=False))
                    if outcome == "exit":
                        return
                    if outcome != "retry":
                        continue
                    events = session.retry()
                show_answer(session, events, err, args["stats"])
            except GenkitError as e:
                err.print(f"genkit: error: {e.message}", markup=False, style="red")
    finally:
        _save_history(history)


def show_answer(session, events, err: Console, want_stats: bool) -> None:
    if session.settings.strategy in ("beam", "beam-sampling", "diverse-beam"):
        err.print(f"[dim]{session.settings.strategy}: the text appears once the search has finished[/dim]")
    stopped = False
    try:
        with render.TextView(1) as view:
            for ev in events:
                view.event(ev)
    except KeyboardInterrupt:
        stopped = True
        events.close()  # Ctrl-C while a token was shown: the engine ends the answer now, not at GC
    if stopped:
        err.print("[dim](stopped)[/dim]")
    if want_stats and session.last is not None:
        err.print(f"[dim]{stats_line(session)}[/dim]")


def read_message() -> str | None:
    """One message: a line, or the lines between two lines of three double quotes (text pasted
    with several lines comes in whole: readline's bracketed paste keeps it one input)."""
    try:
        line = input(PROMPT)
    except EOFError:
        return None
    if not line.lstrip().startswith(BLOCK):
        return line
    first = line.lstrip()[len(BLOCK):]
    if first.rstrip().endswith(BLOCK) and first.strip():  # """one line"""
        return first.rstrip()[: -len(BLOCK)]
    lines = [first] if first else []
    while True:
        try:
            more = input(MORE)
        except EOFError:
            break
        if more.rstrip().endswith(BLOCK):
            lines.append(more.rstrip()[: -len(BLOCK)])
            break
        lines.append(more)
    return "\n".join(lines).strip("\n")


def _start_readline():
    """Line editing and the history file in genkit's config directory (none where readline is
    missing or the file cannot be read: the chat works without them)."""
    try:
        import readline
    except ImportError:
        return None
    path = history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LENGTH)
    return readline


def _save_history(readline) -> None:
    if readline is None:
        return
    path = history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass

"""`genkit chat`: a conversation in the terminal, or one answer per line of a pipe.

The command takes every flag of `genkit run` (its signature is built from run's, so a flag added
to run is a flag of chat too), reads lines and renders answers; genkit/chat.py holds the
conversation and decides what each slash command does.
"""

from __future__ import annotations

import inspect
import sys
from typing import Annotated, Optional

import typer

from genkit.cli import run_cmd
from genkit.errors import GenkitError, did_you_mean

# run's flags that make no sense in a conversation: the prompt argument and one-shot outputs.
NOT_FOR_CHAT = {"prompt", "json_out", "logprobs"}

HELP = """\
/set KEY VALUE   change a generation parameter (as --set does); /set alone shows them
/preset NAME     switch to a preset (your /set values stay on top)
/system TEXT     a new system prompt; /system alone goes back to the preset's
/retry           answer the last message again
/undo            forget the last message and its answer
/clear           start the conversation over
/save FILE       write the conversation to a JSON file
/load FILE       continue a saved conversation
/stats           the last answer's speed and the cache's share of its prompt
/help            this list
/exit            leave (Ctrl-D does too)
Ctrl-C stops an answer. A line of three double quotes (\"\"\") starts and ends a multi-line message."""

BLOCK = '"""'


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)


def chat(**args) -> None:
    """Talk with a model: answers stream as they come, the conversation's cache is kept between
    turns. Piped, each line of stdin is one message and each answer one line of stdout."""
    from genkit import presets

    # Everything the user typed is checked before the model loads, as in `genkit run`.
    overrides = run_cmd.generation_overrides(args)
    presets.resolve(args["preset"], args["generation_config"], overrides, presets.parse_vars(args["var"] or []))
    opts = run_cmd.load_options(args)
    conversation_id, history, logged_system = run_cmd.continued_conversation(args)
    lm = _load(args["model"], opts)
    session = _session(lm, args, overrides)
    session.conversation_id = conversation_id
    if history:
        session.restore(history)
        if args["system"] is None:
            session.set_system(logged_system)
    if sys.stdin.isatty():
        from genkit.cli import chat_tty

        chat_tty.loop(session, args)
    else:
        piped_loop(session, args["stats"])


def _load(model, opts):
    from genkit.cli import options as o

    return o.load_model(model, opts)


def _session(lm, args: dict, overrides: dict):
    from genkit import presets
    from genkit.chat import ChatSession
    from genkit.cli import options as o

    session = ChatSession(
        lm, preset=args["preset"], generation_config=args["generation_config"], overrides=overrides,
        vars=presets.parse_vars(args["var"] or []), system=args["system"], raw=args["raw"],
    )
    if session.settings.assistant_model:
        session.assistant = o.load_model(session.settings.assistant_model, run_cmd._assistant_options(lm))
    return session


# ---------------------------------------------------------------- piped: one line, one answer

def escape(text: str) -> str:
    """An answer on one line: backslashes and newlines written as \\\\ and \\n."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def piped_loop(session, want_stats: bool) -> None:
    failed = False
    for number, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            events = session.ask(line) if not line.startswith("/") else None
            if events is None:
                outcome = run_command(session, line, _stderr_say)
                if outcome == "exit":
                    break
                if outcome != "retry":
                    continue
                events = session.retry()
            for ev in events:
                if ev.text:
                    sys.stdout.write(escape(ev.text))
                    sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            if want_stats:
                _stderr_say(stats_line(session))
        except GenkitError as e:
            failed = True
            _stderr_say(f"genkit: error: line {number}: {e.message}")
    if failed:
        raise SystemExit(1)


def _stderr_say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- slash commands

def run_command(session, line: str, say) -> str | None:
    """Carry out one slash command; `say` shows a line to the user. 'exit' when it is time to go.
    A bad command raises GenkitError (one line; the chat goes on)."""
    name, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    handler = COMMANDS.get(name)
    if handler is None:
        raise GenkitError(f"unknown command {name}{did_you_mean(name, COMMANDS)}: /help lists the commands")
    return handler(session, rest, say)


def _set(session, rest, say):
    if not rest:
        diff = session.settings_diff()
        say(", ".join(f"{k}={v}" for k, v in sorted(diff.items())))
        return None
    key, sep, value = rest.partition("=") if "=" in rest.split(" ", 1)[0] else rest.partition(" ")
    if not value.strip():
        raise GenkitError(f"/set {rest}: expected /set KEY VALUE, e.g. /set temperature 0.7")
    k, v = session.set_param(key.strip(), value.strip())
    say(f"{k} = {v}")
    return None


def _preset(session, rest, say):
    if not rest:
        say(f"preset: {session.resolved.name} ({session.settings.strategy})")
        return None
    session.use_preset(rest)
    say(f"preset: {session.resolved.name} ({session.settings.strategy})")
    return None


def _system(session, rest, say):
    session.set_system(rest or None)
    say(f"system prompt: {session.system}" if session.system else "no system prompt")
    return None


def _undo(session, rest, say):
    gone = session.undo()
    say(f"forgot {gone} message{'s' if gone > 1 else ''}")
    return None


def _clear(session, rest, say):
    session.clear()
    say("conversation cleared")
    return None


def _needs_file(rest: str, command: str) -> str:
    if not rest:
        raise GenkitError(f"{command} needs a file name, e.g. {command} chat.json")
    return rest


def _save(session, rest, say):
    path = session.save(_needs_file(rest, "/save"))
    say(f"saved {len(session.messages)} messages to {path}")
    return None


def _load_file(session, rest, say):
    n = session.load(_needs_file(rest, "/load"))
    say(f"loaded {n} messages from {rest}")
    return None


def _stats(session, rest, say):
    say(stats_line(session) if session.last else "no answer yet")
    t = session.totals
    say(f"conversation: {t.turns} answers, {t.completion_tokens} tokens generated, "
        f"{t.prefilled_tokens} prompt tokens prefilled, {t.reused_tokens} taken from the cache")
    return None


def _help(session, rest, say):
    say(HELP)
    return None


def _exit(session, rest, say):
    return "exit"


def _retry_placeholder(session, rest, say):
    return "retry"  # the loop renders the new answer as it renders any other


COMMANDS = {
    "/set": _set, "/preset": _preset, "/system": _system, "/retry": _retry_placeholder, "/undo": _undo,
    "/clear": _clear, "/save": _save, "/load": _load_file, "/stats": _stats, "/help": _help,
    "/exit": _exit, "/quit": _exit,
}


def stats_line(session) -> str:
    s = session.last
    ttft = f"first token {s.time_to_first_token_s:.2f} s" if s.time_to_first_token_s is not None else "no tokens"
    return (f"{s.completion_tokens} tokens · {s.tokens_per_s:.1f} tokens/s · {ttft} · "
            f"prompt {s.prompt_tokens} tokens ({s.reused_tokens} from the cache) · finish: {s.finish_reason}")


# ---------------------------------------------------------------- the command's signature

def _signature() -> inspect.Signature:
    """run's parameters (less the one-shot ones) followed by chat's own."""
    run_params = [p for name, p in inspect.signature(run_cmd.run, eval_str=True).parameters.items()
                  if name not in NOT_FOR_CHAT]
    return inspect.Signature(run_params + CHAT_OWN)


CHAT_OWN: list[inspect.Parameter] = []

chat.__signature__ = _signature()
chat.__annotations__ = {p.name: p.annotation for p in chat.__signature__.parameters.values()}

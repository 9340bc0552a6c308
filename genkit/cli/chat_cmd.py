"""`genkit chat`: a conversation in the terminal, or one answer per line of a pipe.

The command takes every flag of `genkit run` (its signature is built from run's, so a flag added
to run is a flag of chat too), reads lines and renders answers; genkit/chat.py holds the
conversation and decides what each slash command does.
"""

from __future__ import annotations

import inspect
import sys
import typer

from genkit.cli import constraint_opts, run_cmd
from genkit.cli.chat_commands import run_command, stats_line
from genkit.errors import GenkitError

# run's flags that make no sense in a conversation: the prompt argument and one-shot outputs.
NOT_FOR_CHAT = {"prompt", "json_out", "logprobs"}



def register(app: typer.Typer) -> None:
    app.command("chat")(chat)


def chat(**args) -> None:
    """Talk with a model: answers stream as they come, the conversation's cache is kept between
    turns. Piped, each line of stdin is one message and each answer one line of stdout."""
    from genkit import presets

    # Everything the user typed is checked before the model loads, as in `genkit run`. chat
    # receives run's flags one by one: the constraint flags become run's one mapping here.
    args = {**args, "constraints": constraint_opts.from_flags(args)}
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

    return ChatSession(
        lm, preset=args["preset"], generation_config=args["generation_config"], overrides=overrides,
        vars=presets.parse_vars(args["var"] or []), system=args["system"], raw=args["raw"],
    )


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


# ---------------------------------------------------------------- the command's signature

def _signature() -> inspect.Signature:
    """run's parameters, less the one-shot ones: Typer reads chat's flags from this."""
    return inspect.Signature([p for name, p in inspect.signature(run_cmd.run, eval_str=True).parameters.items()
                              if name not in NOT_FOR_CHAT])


chat.__signature__ = _signature()
chat.__annotations__ = {p.name: p.annotation for p in chat.__signature__.parameters.values()}

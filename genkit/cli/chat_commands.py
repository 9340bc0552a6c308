"""The slash commands of `genkit chat`: parsing a command line and telling the user what changed.
What a command does to the conversation is decided in genkit/chat.py."""

from __future__ import annotations

from genkit.errors import GenkitError, did_you_mean

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


def _retry(session, rest, say):
    return "retry"  # the caller renders the new answer as it renders any other


COMMANDS = {
    "/set": _set, "/preset": _preset, "/system": _system, "/retry": _retry, "/undo": _undo,
    "/clear": _clear, "/save": _save, "/load": _load_file, "/stats": _stats, "/help": _help,
    "/exit": _exit, "/quit": _exit,
}


def stats_line(session) -> str:
    s = session.last
    ttft = f"first token {s.time_to_first_token_s:.2f} s" if s.time_to_first_token_s is not None else "no tokens"
    return (f"{s.completion_tokens} tokens · {s.tokens_per_s:.1f} tokens/s · {ttft} · "
            f"prompt {s.prompt_tokens} tokens ({s.reused_tokens} from the cache) · finish: {s.finish_reason}")

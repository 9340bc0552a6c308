"""A conversation with a loaded model: messages, settings that change between turns, the KV
cache kept from turn to turn, and saving / loading the conversation.

The CLI (genkit/cli/chat_cmd.py) reads lines and renders answers; everything a slash command
decides happens here, so the Python API can hold a conversation the same way:

    session = ChatSession(lm, preset="greedy")
    for event in session.ask("Hello"):
        print(event.text, end="")
    session.messages   # [{"role": "user", ...}, {"role": "assistant", ...}]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from genkit import params as P
from genkit import presets
from genkit.errors import GenkitError

SAVE_FORMAT = 1


@dataclass
class TurnStats:
    """What one answer cost: the engine's stats plus how much of the prompt the cache held."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    time_to_first_token_s: float | None = None
    finish_reason: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class Totals:
    turns: int = 0
    completion_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run through the model
    reused_tokens: int = 0
    history: list[TurnStats] = field(default_factory=list)


class ChatSession:
    """One conversation. Settings resolve lowest first: the model's generation config < preset <
    generation config file < the command's flags < `/set` values."""

    def __init__(self, lm, *, preset: str | None = None, generation_config: str | None = None,
                 overrides: dict | None = None, vars: dict | None = None, system: str | None = None,
                 raw: bool = False, assistant=None, conversation_id: str | None = None):
        from genkit.engine.turns import TurnCache

        self.lm = lm
        self.preset_ref = preset
        self.generation_config = generation_config
        self.flag_overrides = dict(overrides or {})
        self.set_overrides: dict = {}
        self.vars = dict(vars or {})
        self.system_override = system
        self.raw = raw
        self.assistant = assistant
        # The id each answer is logged under (genkit/logs.py); None: not logged.
        self.conversation_id = conversation_id
        self.messages: list[dict] = []
        self.cache = TurnCache()
        self.totals = Totals()
        self.last: TurnStats | None = None
        self.last_result = None  # the engine's SequenceResult of the last answer
        self.resolved, self.settings = self._resolve(preset, self.set_overrides)

    # -- settings

    def _resolve(self, preset, set_overrides):
        from genkit.engine.settings import build

        resolved = presets.resolve(preset, self.generation_config, {**self.flag_overrides, **set_overrides}, self.vars)
        settings = build(self.lm, resolved.generation)
        if settings.num_return_sequences != 1:
            raise GenkitError("a chat answers with one sequence: num_return_sequences must be 1")
        return resolved, settings

    def set_param(self, key: str, value: str) -> tuple[str, object]:
        """`/set KEY VALUE`, validated as `--set key=value` is; nothing changes when it fails."""
        try:
            parsed = presets.parse_set([f"{key}={value}"])
        except GenkitError as e:
            raise GenkitError(e.message.replace("--set ", "/set ", 1)) from None
        merged = {**self.set_overrides, **parsed}
        self.resolved, self.settings = self._resolve(self.preset_ref, merged)
        self.set_overrides = merged
        return next(iter(parsed.items()))

    def use_preset(self, name: str) -> None:
        self.resolved, self.settings = self._resolve(name, self.set_overrides)
        self.preset_ref = name

    @property
    def system(self) -> str | None:
        return self.system_override if self.system_override is not None else self.resolved.system

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None: back to the preset's). The messages stay."""
        self.system_override = text

    def settings_diff(self) -> dict:
        diff = presets.diff_from_defaults(self.settings.explicit)
        diff["max_new_tokens"] = self.settings.max_new_tokens
        return diff

    # -- turns

    def ask(self, text: str):
        """Add the user's message and answer it: an iterator of the engine's events."""
        if not text.strip():
            raise GenkitError("the message is empty: type some text")
        self.messages.append({"role": "user", "content": presets.render_prompt(self.resolved, text)})
        return self._answer(added=True)

    def retry(self):
        """Answer the last message again (sampling gives a new answer; greedy the same one)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise GenkitError("nothing to retry: send a message first")
        return self._answer(added=False)

    def undo(self) -> int:
        """Forget the last exchange (the answer and the message it answered); how many went."""
        if not self.messages:
            raise GenkitError("nothing to undo: the conversation is empty")
        gone = 1
        last = self.messages.pop()
        if last["role"] == "assistant" and self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
            gone = 2
        return gone

    def clear(self) -> None:
        self.messages.clear()
        self.cache.drop()
        self._new_conversation()

    def _new_conversation(self) -> None:
        """After /clear or /load the log records a conversation of its own."""
        if self.conversation_id is not None:
            from genkit import logs

            self.conversation_id = logs.new_conversation_id()

    def _answer(self, added: bool):
        from genkit.api import prepare

        # The messages hold each user text already through the preset's template (`ask`).
        gen = prepare(self.lm, self.resolved, [list(self.messages)], settings=self.settings, system=self.system,
                      raw=self.raw, assistant=self.assistant, turn_cache=self.cache)
        try:
            yield from gen
        finally:
            # Also on Ctrl-C: what was shown of the answer stays in the conversation.
            self._commit(gen, added)

    def _commit(self, gen, added: bool) -> None:
        if not gen.results:  # stopped before the engine started (a prompt too long for the context)
            if added:
                self.messages.pop()
            return
        result = self.last_result = gen.results[0]
        self.messages.append({"role": "assistant", "content": result.text})
        st = gen.stats
        reused = self.cache.reused
        self.last = TurnStats(
            prompt_tokens=st.prompt_tokens, reused_tokens=reused, completion_tokens=st.completion_tokens,
            elapsed_s=st.elapsed_s, time_to_first_token_s=st.time_to_first_token_s,
            finish_reason=result.finish_reason,
        )
        t = self.totals
        t.turns += 1
        t.completion_tokens += st.completion_tokens
        t.prefilled_tokens += st.prompt_tokens - reused
        t.reused_tokens += reused
        t.history.append(self.last)
        if self.conversation_id is not None:
            from genkit import logs

            logs.record_generation(
                self.conversation_id, "chat", gen, model=self.lm.name, preset=self.resolved.name,
                system=self.system, history=self.messages[:-2], prompt=self.messages[-2]["content"],
                settings=self.settings_diff(), extra_timings={"reused_prompt_tokens": reused},
            )

    # -- files

    def save(self, path: str) -> Path:
        target = Path(path).expanduser()
        data = {
            "format": SAVE_FORMAT, "model": self.lm.name, "preset": self.resolved.name,
            "system": self.system_override, "settings": self.set_overrides, "messages": self.messages,
        }
        try:
            target.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise GenkitError(f"cannot write {target}: {e.strerror}; choose another file") from None
        return target

    def load(self, path: str) -> int:
        """Replace the conversation with a saved one (its messages, system prompt and /set values)."""
        source = Path(path).expanduser()
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except OSError as e:
            raise GenkitError(f"cannot read {source}: {e.strerror}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise GenkitError(f"{source} is not a saved chat (invalid JSON: {e})") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        check_messages(messages, str(source))
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise GenkitError(f"{source}: 'settings' must be a mapping of generation parameters")
        settings = P.check_params(settings, str(source))
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise GenkitError(f"{source}: 'system' must be text")
        self.resolved, self.settings = self._resolve(self.preset_ref, settings)
        self.set_overrides = settings
        self.system_override = system
        self.restore(messages)
        self._new_conversation()
        return len(messages)

    def restore(self, messages: list[dict]) -> None:
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        self.cache.drop()


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list):
        raise GenkitError(f"{where}: no 'messages' list; save a chat with /save first")
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system")
                or not isinstance(m.get("content"), str)):
            raise GenkitError(f"{where}: message {i + 1} needs a role (user, assistant) and text content")

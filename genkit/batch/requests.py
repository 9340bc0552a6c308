"""A batch record as genkit reads it (`Request`), and the checks of its fields."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    """One record of the input, checked; `error` is set when it cannot run."""

    line: int  # 1-based line number in INPUT
    id: Any
    prompt: Any = None  # a string, or a list of chat messages
    preset: str | None = None
    vars: dict = field(default_factory=dict)
    system: str | None = None
    params: dict = field(default_factory=dict)  # genkit parameter names, validated
    metadata: Any = None
    error: str | None = None
    resolved: Any = None  # presets.Preset once resolved
    prompt_text: Any = None  # the prompt after the preset's template (or the chat as it is)
    seed: int | None = None  # the seed it samples with
    fingerprint: str | None = None  # what its output line is made from (plan.fingerprint_of)
    logprobs: int | None = None  # alternatives per token to report (OpenAI's top_logprobs); None: off

    @property
    def key(self) -> str:
        return record_key(self.id)


def record_key(id_: Any) -> str:
    """The identity of a record in INPUT and OUTPUT (ids 1 and "1" are different records)."""
    return json.dumps(id_, sort_keys=True, ensure_ascii=False)


def check_id(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, not {json.dumps(value)}")


def opt_str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"'{key}' must be a non-empty string")
    return value


def vars_of(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or any(isinstance(v, (dict, list)) for v in value.values()):
        raise ValueError("'vars' must be an object of name: value, e.g. {\"target\": \"French\"}")
    return {str(k): str(v) for k, v in value.items()}


def prompt_of(prompt: Any, messages: Any) -> Any:
    if prompt is not None and messages is not None:
        raise ValueError("a record has 'prompt' or 'messages', not both")
    if messages is not None:
        return messages_of(messages)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("no prompt: give 'prompt' (a non-empty string) or 'messages' (a chat)")
    return prompt


def messages_of(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a 'role' and a 'content'")
        out.append({"role": m["role"], "content": content_text(m.get("content"), i)})
    return out


def content_text(content: Any, i: int) -> str:
    # OpenAI allows content as a list of parts; genkit's models read text parts only.
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ValueError(f"messages[{i}].content must be a string or a list of text parts")


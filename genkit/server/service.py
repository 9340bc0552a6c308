"""From a parsed request to engine work, and from engine events to OpenAI's response shapes.

A request's model name picks the preset: `MODEL` uses the server's default preset and
`MODEL:PRESET` any preset of `genkit presets list`. Prompts are rendered and tokenized here,
exactly as `genkit.generate` does (chat template for chat requests, the text as it is for
completions), so that a prompt over the context is refused before it is queued.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genkit import api
from genkit import presets as presets_mod
from genkit import prompts as prompts_mod
from genkit import seeding
from genkit.batch.openai import OPENAI_FINISH
from genkit.engine.tracker import Event
from genkit.errors import GenkitError
from genkit.logprobs import TokenText, openai_content, openai_legacy, token_records
from genkit.server import schema
from genkit.server.scheduler import Done, Work


def served_name(lm) -> str:
    """A local directory or file is served under its last path component."""
    return Path(lm.name).name if os.path.exists(lm.name) else lm.name


@dataclass
class Channel:
    """Events from the engine thread into the request's asyncio task."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def sender(self, prompt_index: int):
        def deliver(item: Event | Done) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (prompt_index, item))
            except RuntimeError:
                pass  # the event loop is gone: the server is exiting
        return deliver


@dataclass
class Prepared:
    """A request ready for the engine."""

    id: str
    object: str  # chat.completion or text_completion
    model: str
    created: int
    n: int
    works: list[Work]
    channel: Channel
    include_usage: bool
    logprobs: int | None = None  # None: none asked; N: alternatives per token
    token_text: TokenText | None = None

    @property
    def choices(self) -> int:
        return self.n * len(self.works)

    def cancel(self) -> None:
        for w in self.works:
            w.cancelled.set()


class Service:
    def __init__(self, lm, *, name: str | None = None, preset: str | None = None):
        self.lm = lm
        self.name = name or served_name(lm)
        self.default_preset = preset
        self.context = lm.context_length if not lm.is_encoder_decoder else None
        self.token_text = TokenText(lm.tokenizer)

    def models(self) -> list[str]:
        return [self.name] + [f"{self.name}:{p}" for p in sorted(presets_mod.available())]

    def preset_of(self, model: str) -> str | None:
        if model == self.name:
            return self.default_preset
        base, sep, preset = model.partition(":")
        if sep and base == self.name and preset in presets_mod.available():
            return preset
        raise schema.APIError(404, f"The model '{model}' does not exist: this server runs '{self.name}' "
                                   f"(GET /v1/models lists it with each preset as {self.name}:PRESET)",
                              param="model", code="model_not_found")

    def prepare(self, req: schema._Common, loop) -> Prepared:
        chat = isinstance(req, schema.ChatRequest)
        preset = self.preset_of(req.model)
        params = schema.generation_params(req)
        logprobs = schema.logprobs_of(req)
        prompts = schema.prompts_of(req)
        try:
            resolved, settings = api.settings_for(self.lm, preset, None, None, **params)
        except GenkitError as e:
            raise schema.APIError(400, e.message) from None
        channel = Channel(loop)
        base_seed = settings.seed if settings.seed is not None else seeding.fresh_seed()
        system = resolved.system
        raw = not chat
        works = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                prompt = presets_mod.render_prompt(resolved, prompt)
            ids = self._tokenize(prompt, system, raw)
            max_new = prompts_mod.fit_max_new_tokens(self.lm, len(ids), settings.max_new_tokens)
            works.append(Work(prompt=prompt, input_ids=ids, settings=settings, seed=seeding.row_seed(base_seed, i),
                              max_new_tokens=max_new, system=system, raw=raw, deliver=channel.sender(i),
                              logprobs=logprobs))
        kind = "chatcmpl" if chat else "cmpl"
        usage = req.stream_options.include_usage if req.stream_options else None
        return Prepared(id=f"{kind}-{uuid.uuid4().hex}", object="chat.completion" if chat else "text_completion",
                        model=req.model, created=int(time.time()), n=settings.num_return_sequences,
                        works=works, channel=channel, include_usage=usage is not False, logprobs=logprobs,
                        token_text=self.token_text)

    def _tokenize(self, prompt, system, raw) -> list[int]:
        try:
            text = prompts_mod.to_text(self.lm, prompt, system=system, raw=raw)
        except GenkitError as e:
            raise schema.APIError(400, e.message, param="messages") from None
        templated = prompts_mod.uses_chat(self.lm, raw)
        ids = self.lm.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if not ids:
            raise schema.APIError(400, "the prompt is empty: send some text")
        if self.context and len(ids) >= self.context:
            raise schema.APIError(
                400, f"the prompt is {len(ids)} tokens but the model's context holds {self.context}: "
                     "shorten it", param="messages" if not raw else "prompt", code="context_length_exceeded")
        return ids


# ---------------------------------------------------------------------- response shapes


@dataclass
class Collected:
    texts: list[str]
    finish: list[str | None]
    records: list[list[dict]]  # per choice, genkit's token records (when log-probabilities are asked)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


def records(p: Prepared, ev: Event) -> list[dict]:
    """genkit's token records (genkit.logprobs) of an event's tokens; none unless asked."""
    if p.logprobs is None or not ev.token_ids:
        return []
    return token_records(p.token_text, ev.token_ids, ev.logprobs or [], ev.alternatives)


def logprobs_object(p: Prepared, recs: list[dict], offset: int = 0) -> dict | None:
    """A choice's `logprobs`: chat's `content[]`, or the completions API's legacy object."""
    if p.logprobs is None:
        return None
    return openai_content(recs) if p.object == "chat.completion" else openai_legacy(recs, offset)


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else OPENAI_FINISH.get(reason, "length")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def choice(p: Prepared, index: int, text: str, reason: str | None, recs: list[dict]) -> dict:
    lp = logprobs_object(p, recs)
    if p.object == "chat.completion":
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(reason), "logprobs": lp}
    return {"index": index, "text": text, "finish_reason": finish_reason(reason), "logprobs": lp}


def completion(p: Prepared, c: Collected) -> dict:
    return {
        "id": p.id, "object": p.object, "created": p.created, "model": p.model,
        "choices": [choice(p, i, c.texts[i], c.finish[i], c.records[i]) for i in range(p.choices)],
        "usage": usage(c.prompt_tokens, c.completion_tokens, c.cached_tokens),
    }


def chunk(p: Prepared, choices: list[dict], usage_: dict | None = None) -> dict:
    obj = "chat.completion.chunk" if p.object == "chat.completion" else "text_completion"
    out = {"id": p.id, "object": obj, "created": p.created, "model": p.model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def delta_choice(p: Prepared, index: int, text: str, reason: str | None, first: bool = False,
                 logprobs: dict | None = None) -> dict:
    if p.object == "chat.completion":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "finish_reason": finish_reason(reason), "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": finish_reason(reason), "logprobs": logprobs}

"""Accepting tokens: stopping rules, incremental text and events, one place for every strategy.

Strategies propose tokens; the tracker decides what is kept. Each output sequence has a
`SequenceState` that appends token ids, stops at an end-of-sequence id, max_new_tokens or a stop
string, and turns the new ids into a text delta (genkit.engine.detokenize: nothing is shown
that the next tokens could still change, and the final text is the tokenizer's decoding of the
ids); text that could be the start of a stop string is held back too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from genkit.engine.detokenize import IncrementalDecoder


@dataclass
class Event:
    """What the engine reports as it goes: new tokens of one sequence, or its end."""

    index: int  # output sequence: prompt_index * num_return_sequences + k
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the text these tokens add
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # eos, stop, length, time, cancelled
    alternatives: list | None = None  # per token its best alternatives [(id, logprob)], where asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SequenceState:
    def __init__(self, tokenizer, eos_ids, max_new_tokens, stop_strings, skip_special=True):
        self.eos = set(eos_ids)
        self.max_new = max_new_tokens
        self.stops = list(stop_strings or [])
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""  # text released so far (never contains a stop string)
        self.finish_reason: str | None = None
        self._pending = ""  # decoded but held back (possible start of a stop string)
        self._decoder = IncrementalDecoder(tokenizer, self.ids, skip_special)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _text_delta(self, final: bool) -> str:
        """New text, stop strings applied; at the end the text is the decoding of every id."""
        delta = self._release(self._decoder.step(final), final)
        if final and self._decoder.diverged:
            self._adopt_decoded()
        return delta

    def _adopt_decoded(self) -> None:
        """When the stream could not follow the tokenizer (see detokenize), the text still is
        the exact decoding, cut at the first stop string."""
        text = self._decoder.released
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            text = text[: min(cuts)]
            self.finish_reason = "stop"
        self.text, self._pending = text, ""

    def add(self, ids: list[int], logprobs: list[float] | None = None) -> Event | None:
        """Append proposed tokens; returns the event they make (None if nothing changed)."""
        if self.done or not ids:
            return None
        kept, reason = [], None
        for i, t in enumerate(ids):
            kept.append(t)
            if t in self.eos:
                reason = "eos"
                break
            if len(self.ids) + len(kept) >= self.max_new:
                reason = "length"
                break
        self.ids.extend(kept)
        lp = None
        if logprobs is not None:
            lp = list(logprobs[: len(kept)])
            self.logprobs.extend(lp)
        delta = self._text_delta(final=reason is not None)
        if self.finish_reason is None:
            self.finish_reason = reason
        return Event(index=-1, token_ids=kept, text=delta, logprobs=lp, finish_reason=self.finish_reason)

    def _release(self, new: str, final: bool) -> str:
        """Check stop strings over the pending text; return the text safe to show now."""
        pending = self._pending + new
        if self.stops:
            hit = min(((pending.find(s), s) for s in self.stops if s in pending), default=None)
            if hit is not None:
                self.finish_reason = "stop"
                out = pending[: hit[0]]
                self._pending = ""
                self.text += out
                return out
            if not final:
                hold = _stop_prefix_length(pending, self.stops)
                out = pending[: len(pending) - hold]
                self._pending = pending[len(out):]
                self.text += out
                return out
        self._pending = ""
        self.text += pending
        return pending

    def finish(self, reason: str) -> Event | None:
        """End the sequence from outside (max_time, cancellation); flush held-back text."""
        if self.done:
            return None
        self.finish_reason = reason
        tail = self._text_delta(final=True)
        return Event(index=-1, text=tail, finish_reason=reason)


def _stop_prefix_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Tracker:
    """All output sequences of one request, plus timing."""

    def __init__(self, tokenizer, n: int, eos_ids, max_new_tokens, stop_strings=None, max_time=None):
        self.seqs = [SequenceState(tokenizer, eos_ids, max_new_tokens, stop_strings) for _ in range(n)]
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.deadline = self.started + max_time if max_time else None

    @property
    def all_done(self) -> bool:
        return all(s.done for s in self.seqs)

    def finished_mask(self) -> list[bool]:
        return [s.done for s in self.seqs]

    def timed_out(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def add(self, rows: list[list[int]], logprobs: list[list[float]] | None = None) -> list[Event]:
        events = []
        for i, ids in enumerate(rows):
            ev = self.seqs[i].add(ids, logprobs[i] if logprobs is not None else None)
            if ev is not None:
                ev.index = i
                events.append(ev)
        if events and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.timed_out():
            events.extend(self.finish_all("time"))
        return events

    def finish_all(self, reason: str) -> list[Event]:
        events = []
        for i, s in enumerate(self.seqs):
            ev = s.finish(reason)
            if ev is not None:
                ev.index = i
                events.append(ev)
        return events

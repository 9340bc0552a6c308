"""Recent prompts' KV cache, kept so that a prompt sharing their beginning prefills only the rest.

Why: requests to a server often begin alike (the same system prompt, the same conversation
before its newest message), and prefilling that beginning again is most of a request's time to
first token. The continuous batcher keeps each prefilled prompt's keys and values here; a new
prompt whose ids start with the first N ids of a kept one (found on ids, never assumed) takes
those N positions' keys and values from it and feeds the model only the tokens after them.
Keys already hold their rotary position, and a row's real tokens are contiguous in the batch
whatever the padding, so a reused prefix is the same numbers a full prefill computes.

Bounded: entries are evicted least recently used first once their keys and values pass
`max_bytes`. A prompt that extends a kept one replaces it (a conversation's next turn), and a
prompt that a kept one already begins with is not stored twice.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# The fewest shared tokens worth reusing; also the length of the index key (`PrefixCache.heads`):
# a prompt is compared only with the kept prompts that begin with the same MIN_REUSE ids.
MIN_REUSE = 4


@dataclass
class Entry:
    ids: torch.Tensor  # (length,) on the CPU, for comparing prompts
    keys: list[torch.Tensor]  # per layer (kv_heads, length, head_dim)
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values)


def shared_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many ids two sequences share from their start."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    def __init__(self, max_bytes: int, min_reuse: int = MIN_REUSE):
        self.max_bytes = max_bytes
        self.min_reuse = min_reuse
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.heads: dict[tuple, set[int]] = {}  # the first min_reuse ids -> the entries beginning so
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def lookup(self, ids: list[int]) -> tuple[Entry, int] | None:
        """The kept entry sharing the most leading ids with `ids`, and how many of its positions
        to reuse: never the prompt's last token, whose logits start the answer."""
        if not self.entries or len(ids) <= self.min_reuse:
            return None
        query = torch.tensor(ids)
        best, best_n = None, 0
        for entry in self._candidates(ids):
            n = shared_length(entry.ids, query)
            if n > best_n:
                best, best_n = entry, n
        best_n = min(best_n, len(ids) - 1)
        if best is None or best_n < self.min_reuse:
            return None
        self.entries.move_to_end(id(best))
        return best, best_n

    def count(self, reused: int) -> None:
        self.hits += 1
        self.reused_tokens += reused

    def store(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep a prompt's keys and values (per layer (kv_heads, len(ids), head_dim), copied)."""
        if len(ids) <= self.min_reuse:
            return
        query = torch.tensor(ids)
        for entry in self._candidates(ids):
            key, n = id(entry), shared_length(entry.ids, query)
            if n == len(ids):  # already kept, as this prompt or the start of a longer one
                self.entries.move_to_end(key)
                return
            if n == len(entry.ids):  # this prompt extends it: keep only the longer one
                self._evict(key)
        entry = Entry(query, [k.clone() for k in keys], [v.clone() for v in values])
        if entry.nbytes > self.max_bytes:
            return
        while self.entries and self.bytes + entry.nbytes > self.max_bytes:
            self._evict(next(iter(self.entries)))
        self.entries[id(entry)] = entry
        self.heads.setdefault(tuple(ids[:self.min_reuse]), set()).add(id(entry))
        self.bytes += entry.nbytes

    def _candidates(self, ids: list[int]) -> list[Entry]:
        return [self.entries[key] for key in self.heads.get(tuple(ids[:self.min_reuse]), ())]

    def _evict(self, key: int) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.nbytes
        head = tuple(entry.ids[:self.min_reuse].tolist())
        self.heads[head].discard(key)
        if not self.heads[head]:
            del self.heads[head]

    def stats(self) -> dict:
        return {"entries": len(self.entries), "tokens": sum(len(e.ids) for e in self.entries.values()),
                "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "reused_tokens": self.reused_tokens}

"""Running a grammar inside the decode loop: one llguidance matcher per output row.

Each step the strategy asks for the rows' allowed tokens, masks everything else to -inf after
the penalties and before the warpers (so top-k, top-p and temperature only ever see allowed
tokens), and hands every accepted token back to its row's matcher. End-of-sequence ids are
allowed only where the grammar accepts, and once the grammar is complete they are the only
tokens left, so a constrained row ends by `eos` with a text the grammar accepts, or by `length`.

The masks are computed by llguidance's executor (from 4 rows, in parallel, outside the GIL) into
one int32 bitmask, then unpacked in one numpy pass on the CPU and moved to the scores'
device. Wrapping a tokenizer for llguidance takes seconds on a 49k vocabulary, so the wrap is
kept on the loaded model and reused by every later request.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from genkit.errors import GenkitError

_EXECUTOR = None
# From this many rows the masks are computed on llguidance's thread pool; below, in this thread
# (a mask takes 0.3-0.6 ms: handing one or two to the pool costs as much as computing them).
PARALLEL_ROWS = 4


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        import llguidance

        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


def unpack(bits: torch.Tensor, width: int, device) -> torch.Tensor:
    """Bool (rows, width) from llguidance's int32 bitmask (rows, words): token t is bit t % 8 of
    byte t // 8 (little-endian words). numpy unpacks every row in one pass on the CPU, where the
    bitmask is, some 15 times faster than a torch table lookup at batch 32; a busy CPU makes torch's
    small multi-threaded ops wait far longer still. An empty row (a finished or failed matcher)
    allows everything: the strategy pads that row anyway."""
    packed = bits.numpy().view(np.uint8)
    flags = np.unpackbits(packed, axis=-1, count=min(width, packed.shape[1] * 8), bitorder="little").view(np.bool_)
    empty = ~packed.any(axis=-1)
    if empty.any():
        flags[empty] = True
    out = torch.from_numpy(flags)
    if out.shape[1] < width:
        out = torch.nn.functional.pad(out, (0, width - out.shape[1]))
    return out.to(device)


def ll_tokenizer(lm, eos_ids: Sequence[int], vocab_size: int):
    """llguidance's view of `lm`'s tokenizer with these eos ids, cached on the loaded model."""
    key = (tuple(eos_ids), vocab_size)
    cache = lm.tokenizer_wraps
    if key not in cache:
        import llguidance.hf

        size = len(lm.tokenizer)
        try:
            cache[key] = llguidance.hf.from_tokenizer(
                lm.tokenizer, n_vocab=max(vocab_size, size), eos_token=list(eos_ids) or None)
        except ValueError as e:
            raise GenkitError(f"constrained output needs a fast (Rust) tokenizer: {e}") from None
    return cache[key]


def new_matcher(lm, grammar: str, eos_ids: Sequence[int], vocab: int):
    """(a fresh matcher for `grammar`, the vocabulary size its masks cover)."""
    from llguidance import LLMatcher

    tokenizer = ll_tokenizer(lm, eos_ids, vocab)
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise GenkitError(f"constraint: {matcher.get_error().strip().splitlines()[0]}")
    return matcher, tokenizer.vocab_size


class RowMatchers:
    """One matcher per row of the scores a strategy processes."""

    def __init__(self, matchers: list, vocab: int, eos_ids: Sequence[int] = (), template=None):
        self.matchers = matchers
        self.vocab = vocab
        self.eos = set(eos_ids)
        self.words = (vocab + 31) // 32
        self.template = template  # a fresh matcher, for replay()

    @classmethod
    def start(cls, lm, grammar: str, rows: int, eos_ids: Sequence[int], vocab: int) -> "RowMatchers":
        first, size = new_matcher(lm, grammar, eos_ids, vocab)
        return cls([first] + [first.deep_copy() for _ in range(rows - 1)], size, eos_ids, first.deep_copy())

    def __len__(self) -> int:
        return len(self.matchers)

    # ------------------------------------------------------------------ masks

    def allowed(self, rows: Sequence[int], width: int, device) -> torch.Tensor:
        """Bool (len(rows), width): the tokens each of `rows` may take next. A row whose matcher
        has nothing left (finished, or failed) allows everything: the strategy pads it anyway."""
        from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

        bits = torch.empty((len(rows), self.words), dtype=torch.int32)
        if len(rows) < PARALLEL_ROWS:
            for i, r in enumerate(rows):
                fill_next_token_bitmask(self.matchers[r], bits, i)
        else:
            fill_next_token_bitmask_par(_executor(), [(self.matchers[r], i) for i, r in enumerate(rows)], bits)
        return unpack(bits, width, device)

    def mask(self, scores: torch.Tensor, rows: Sequence[int] | None = None,
             fallback: torch.Tensor | None = None) -> torch.Tensor:
        """`scores` with every token the grammar forbids at -inf. Where the processors already
        removed every allowed token (min_new_tokens against a complete grammar), the grammar
        wins: that row's `fallback` scores (the raw logits) are masked instead."""
        rows = range(len(self.matchers)) if rows is None else rows
        return apply(scores, self.allowed(rows, scores.shape[-1], scores.device), fallback)

    # ------------------------------------------------------------------ state

    def consume(self, row: int, tokens: Sequence[int]) -> None:
        """Advance `row`'s matcher over accepted tokens."""
        m = self.matchers[row]
        if m.is_stopped() and not m.is_error() and all(t in self.eos for t in tokens):
            return  # a complete grammar stops by itself; the eos that ends the row is not its token
        if not m.consume_tokens(list(tokens)):
            raise GenkitError(f"constraint: token(s) {list(tokens)} rejected by the grammar: {m.get_error()}")

    def consume_rows(self, tokens: Sequence[int], active: Sequence[bool]) -> None:
        """One token per row, for the rows still generating."""
        for row, (t, live) in enumerate(zip(tokens, active)):
            if live:
                self.consume(row, [t])

    def rollback(self, row: int, count: int) -> None:
        if count and not self.matchers[row].rollback(count):
            raise GenkitError(f"constraint: could not roll back {count} token(s): {self.matchers[row].get_error()}")

    def accepting(self, row: int) -> bool:
        m = self.matchers[row]
        return bool(m.is_accepting()) and not m.is_error()

    def reorder(self, index: Sequence[int]) -> None:
        """Rows become the rows at `index` (beams reordering): a row taken twice is copied."""
        seen, matchers = set(), []
        for i in index:
            matchers.append(self.matchers[i].deep_copy() if i in seen else self.matchers[i])
            seen.add(i)
        self.matchers = matchers

    def advance(self, src: Sequence[int], tokens: Sequence[int], live: Sequence[bool]) -> None:
        """Beams: row r continues row src[r] with tokens[r]. Rows that are not live (a beam with
        no finite score, a prompt whose search is over) keep a stale matcher: nothing reads them."""
        self.reorder(src)
        for row, (t, ok) in enumerate(zip(tokens, live)):
            if ok:
                self.consume(row, [t])

    def replay(self, sequences: Sequence[Sequence[int]]) -> None:
        """Matchers for these token sequences (a beam search's final hypotheses, which are not
        the rows the search ran on), so that `accepting` answers for them."""
        self.matchers = []
        for tokens in sequences:
            m = self.template.deep_copy()
            body = list(tokens)
            while body and body[-1] in self.eos:
                body.pop()
            m.try_consume_tokens(body)
            self.matchers.append(m)


def apply(scores: torch.Tensor, allowed: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """`scores` at -inf wherever `allowed` is False. A row left with no finite score (the
    processors removed every allowed token) takes its `fallback` scores, masked, instead.

    `scores` is written in place unless it is `fallback` (the raw logits, which strategies read
    again): the callers pass what their processors just made. On the CPU numpy does it in one
    single-threaded pass: on a busy machine every extra multi-threaded torch op over the
    (rows, vocab) scores waits milliseconds for a descheduled thread, more than the mask costs."""
    if scores.device.type == "cpu" and scores.dtype in _NUMPY_FLOATS and scores.is_contiguous():
        out = scores if fallback is not None and scores is not fallback else scores.clone()
        values = out.numpy()
        np.putmask(values, ~allowed.numpy(), -np.inf)
        dead = np.isneginf(values.max(axis=-1))
        dead = torch.from_numpy(dead) if dead.any() else None
    else:
        out = torch.where(allowed, scores, scores.new_full((), -math.inf))
        dead = torch.isneginf(out.max(dim=-1).values)
        dead = dead if bool(dead.any()) else None
    if dead is not None and fallback is not None and fallback is not scores:
        out[dead] = fallback[dead].to(out.dtype).masked_fill(~allowed[dead], -math.inf)
    return out


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


class Draft:
    """One row's matcher through a draft-and-verify cycle (assisted and prompt-lookup decoding).

    Draft tokens are consumed tentatively, so that each verification position j (after j draft
    tokens) has the grammar's mask; the target's verdict then keeps the accepted ones, rolls back
    the rest and consumes the target's own token. The target verifies against masked
    distributions, so it accepts exactly what plain constrained decoding would have chosen."""

    def __init__(self, rows: RowMatchers, row: int, width: int, device):
        self.rows, self.row = rows, row
        self.width, self.device = width, device
        self.masks: list[torch.Tensor] = []  # masks[j]: allowed after j pending tokens
        # Per pending token, whether the matcher recorded it: an eos after the grammar stopped
        # by itself is accepted but not recorded, so a rollback must not count it.
        self.recorded: list[bool] = []

    @property
    def pending(self) -> int:
        """Draft tokens consumed tentatively."""
        return len(self.recorded)

    def mask(self, j: int) -> torch.Tensor:
        """Bool (width,): the tokens allowed at verification position j."""
        if j == len(self.masks) == self.pending:
            self.masks.append(self.rows.allowed([self.row], self.width, self.device)[0])
        return self.masks[j]

    def push(self, tokens: Sequence[int]) -> int:
        """Consume draft tokens tentatively up to the first the grammar forbids; the pending count."""
        m = self.rows.matchers[self.row]
        for t in tokens:
            if not bool(self.mask(self.pending)[t]):
                break
            if m.is_stopped() and t in self.rows.eos:
                self.recorded.append(False)
                continue
            if not m.consume_token(t):
                raise GenkitError(f"constraint: draft token {t} rejected by the grammar: {m.get_error()}")
            self.recorded.append(True)
        return self.pending

    def settle(self, accepted: int, token: int) -> None:
        """The target kept `accepted` draft tokens and then chose `token`."""
        self.rows.rollback(self.row, sum(self.recorded[accepted:]))
        self.rows.consume(self.row, [token])
        self.masks, self.recorded = [], []


class PerRow:
    """The constraint of a request's settings for callers that keep each row's matcher
    themselves (continuous batching: rows join and leave the batch): a fresh matcher per row,
    masks over any list of matchers. False when the settings constrain nothing."""

    def __init__(self, lm, settings, vocab: int):
        from genkit import constraints

        grammar = constraints.grammar_for(settings.params(), "settings")
        self.template, self.size, self.eos_ids = None, vocab, settings.eos_ids
        if grammar is not None:
            self.template, self.size = new_matcher(lm, grammar, settings.eos_ids, vocab)

    def __bool__(self) -> bool:
        return self.template is not None

    def new(self):
        return self.template.deep_copy() if self.template is not None else None

    def mask(self, matchers: list, scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return RowMatchers(matchers, self.size, self.eos_ids).mask(scores, fallback=logits)

    def consume(self, matcher, token: int) -> None:
        RowMatchers([matcher], self.size, self.eos_ids).consume(0, [token])

    @staticmethod
    def complete(matcher, reason: str | None) -> bool | None:
        if matcher is None:
            return None
        return reason != "stop" and bool(matcher.is_accepting()) and not matcher.is_error()

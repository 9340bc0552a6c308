"""Continuous batching for greedy decoding and sampling: a finished row's slot is refilled at once.

Why: in a padded static batch every row waits for the longest one, and short prompts pay for
the padding of long ones. Here a job (one prompt) is prefilled when a slot frees up, its KV
cache is merged into the running batch, and each row leaves the batch on the step it finishes.

Layout: the running batch is right-aligned, as generate() lays out a left-padded batch. Row b's
real tokens fill the last columns of the cache and of the attention mask; the columns to their
left are masked padding. Merging a newly prefilled group left-pads whichever side is narrower;
dropping finished rows can leave columns that are padding for every row, and those are cut.
Position ids are per row (the count of the row's real tokens before), so what a row computes
does not depend on the padding its neighbours force on it.

Reused rather than rewritten: SequenceState (stopping rules, incremental text), the processors
and warpers of genkit.engine.processors, sample_rows / processed_logprobs, and row_generator, so a
seeded job draws the same tokens here as through `Generation`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from genkit.engine import constrain
from genkit.engine import processors as procs
from genkit.engine import strategies
from genkit.engine.core import row_generator
from genkit.engine.kvbuffers import KVLayer as _Layer, left_pad as _left_pad, pack as _pack
from genkit.engine.runner import with_cache
from genkit.engine.settings import DecodeSettings
from genkit.engine.strategies.base import processed_logprobs, sample_rows
from genkit.engine.tracker import SequenceState

# Padded prompt tokens per prefill pass: large enough for efficient matrix products, small
# enough that a chunk of length-sorted prompts carries little padding.
PREFILL_TOKENS = 1024


@dataclass
class Job:
    """One prompt to complete; `handle` comes back with its result."""

    handle: Any
    input_ids: list[int]
    seed: int
    max_new_tokens: int
    stop_strings: list[str] | None = None
    reuse: Any = None  # (prefixes.Entry, positions): a kept prefix this prompt begins with
    cached_tokens: int = 0  # prompt positions whose keys and values came from the prefix cache


@dataclass
class Sequence:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    complete: bool | None = None  # constrained output: whether the grammar accepts the text
    alternatives: list | None = None  # per token, its best alternatives [(id, logprob)] (top_logprobs)


@dataclass
class JobResult:
    handle: Any
    sequences: list[Sequence]
    prompt_tokens: int
    started_at: float
    first_token_at: float | None
    finished_at: float

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


@dataclass
class _Active:
    """A job whose rows are in the running batch."""

    job: Job
    rows_left: int
    states: list[SequenceState]
    started_at: float
    deadline: float | None
    first_token_at: float | None = None
    matchers: list = field(default_factory=list)  # each sequence's matcher (None: unconstrained)
    alternatives: list = field(default_factory=list)  # each sequence's list of per-token alternatives


@dataclass
class _Row:
    active: _Active
    state: SequenceState
    generator: torch.Generator | None
    history: list[int] = field(default_factory=list)  # prompt + generated, for the processors
    matcher: Any = None  # the row's llguidance matcher when the output is constrained
    alternatives: list = field(default_factory=list)


def supported(lm, settings: DecodeSettings) -> bool:
    """Whether continuous batching can run these settings on this model."""
    if not strategies.get(settings.strategy).continuous or lm.is_encoder_decoder:
        return False
    if lm.backend.kind == "native":
        # genkit's own decoders keep every position and mask a sliding window themselves, so any
        # architecture batches; of them only the GGUF decoder takes a transformers cache.
        return getattr(lm.model, "continuous_batching", False)
    # Sliding-window and other special layers keep state that left-padding would corrupt.
    layers = DynamicCache(config=lm.model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _new_cache(lm) -> DynamicCache:
    """An empty cache for one prefill: the config's layers for transformers' forward, plain
    full-length layers (made on first use) for genkit's native decoder, which windows by mask."""
    if lm.backend.kind == "native":
        return DynamicCache()
    return DynamicCache(config=lm.model.config)


class ContinuousBatcher:
    """Runs jobs that share one DecodeSettings (seed, max_new_tokens and stop strings may differ
    per job) through one running batch of at most `batch_size` rows.

    `max_batch_tokens` bounds rows x the widest KV cache they can reach (prompt + new tokens),
    the memory that the batch may grow to; a job larger than the budget still runs, alone.
    """

    def __init__(self, lm, settings: DecodeSettings, *, batch_size: int = 32,
                 max_batch_tokens: int | None = None, logprobs: bool | int = False):
        self.lm = lm
        self.model = lm.model
        # genkit's decoder: the native model itself, or the one over an fp32 model's weights
        self.fast = lm.model if lm.backend.kind == "native" else lm.backend.fast
        self.s = settings
        self.n = settings.num_return_sequences
        self.batch_size = max(1, batch_size)
        self.budget = max_batch_tokens
        # logprobs: False, True, or N: each token's log-probability and its N best alternatives
        self.want_logprobs = logprobs is not None and logprobs is not False
        self.top_logprobs = 0 if isinstance(logprobs, bool) or not logprobs else int(logprobs)
        self._scores: torch.Tensor | None = None  # the last step's processed scores
        self.device = lm.device
        vocab = self.model.config.get_text_config().vocab_size
        self._proc_kw = dict(attention_mask=None, vocab_size=vocab, device=self.device)
        self._procs: dict[int, Any] = {}
        self.warpers = procs.build_warpers(settings, device=self.device)
        self.watermark = procs.build_watermark(settings, vocab_size=vocab, device=self.device)
        self.uses_history = bool(self._processors(0)) or bool(self.watermark)
        self.matchers = constrain.PerRow(lm, settings, vocab)
        # Refilling one slot at a time costs a prefill pass per job; wait for a few free slots.
        self.refill_at = max(1, self.batch_size // 8)
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, width) 1 for real tokens
        self.next_pos: torch.Tensor | None = None  # (rows,) position id of the next token
        self.last: torch.Tensor | None = None  # (rows,) the token to feed next
        self.prefixes = None  # genkit.engine.prefixes.PrefixCache: recent prompts' KV, when kept
        self.prefilled_tokens = 0  # prompt tokens fed to the model (not taken from `prefixes`)

    # ------------------------------------------------------------------ the loop

    def run(self, jobs: Iterable[Job]) -> Iterator[JobResult]:
        """Results as jobs finish (not in the order given). Callers sort by prompt length."""
        waiting = deque(jobs)
        with torch.inference_mode():
            while waiting or self.rows:
                if waiting and self._should_admit():
                    group = self._take(waiting)
                    yield from self._admit(group)
                if self.rows:
                    yield from self._step()

    def _should_admit(self) -> bool:
        free = self.batch_size - len(self.rows)
        return not self.rows or free >= min(self.refill_at * self.n, self.batch_size)

    def rows_of(self, job: Job) -> int:
        """Rows a job takes in the batch (a subclass may let jobs differ)."""
        return self.n

    def _future_width(self) -> int:
        """The widest the cache can grow for the running rows (prompt + every new token)."""
        return max((r.active.job.max_new_tokens + len(r.active.job.input_ids) for r in self.rows), default=0)

    def _take(self, waiting: deque) -> list[Job]:
        """The next jobs that fit in the free rows and the token budget (at least one when idle)."""
        group: list[Job] = []
        rows = len(self.rows)
        width = self._future_width()
        while waiting:
            job = waiting[0]
            w = max(width, len(job.input_ids) + job.max_new_tokens)
            busy = rows > 0 or group
            n = self.rows_of(job)
            if busy and rows + n > self.batch_size:
                break
            if busy and self.budget and (rows + n) * w > self.budget:
                break
            group.append(waiting.popleft())
            rows, width = rows + n, w
        return group

    # ------------------------------------------------------------------ admission

    def _admit(self, group: list[Job]) -> Iterator[JobResult]:
        """Prefill the group in chunks of similar length (jobs come sorted), so that a short
        prompt is not padded to the longest of the group: prefill is most of the work. The
        length that counts is what a prompt must feed, after the prefix it finds kept."""
        chunk: list[Job] = []
        width = 0
        for job in group:
            need = self._plan_reuse(job)
            if chunk and (len(chunk) + 1) * max(width, need) > PREFILL_TOKENS:
                yield from self._prefill(chunk)
                chunk, width = [], 0
                need = self._plan_reuse(job)  # the chunk just prefilled may hold its prefix now
            chunk.append(job)
            width = max(width, need)
        if chunk:
            yield from self._prefill(chunk)

    def _plan_reuse(self, job: Job) -> int:
        """How many prompt tokens the job must feed: those after the longest kept prefix."""
        job.reuse = self.prefixes.lookup(job.input_ids) if self.prefixes is not None else None
        return len(job.input_ids) - (job.reuse[1] if job.reuse else 0)

    def _prefill(self, group: list[Job]) -> Iterator[JobResult]:
        """Prefill jobs together, choose their first tokens and merge them into the batch.

        Each row feeds the same number of new tokens (`new`, the most any job needs); a row
        whose prompt is longer takes its first positions from its kept prefix, a shorter one is
        left-padded. Either way its real tokens stay contiguous and right-aligned."""
        pad = self.s.pad_id
        new = max(len(j.input_ids) - (j.reuse[1] if j.reuse else 0) for j in group)
        for j in group:
            j.cached_tokens = max(0, len(j.input_ids) - new)
        kept = max(j.cached_tokens for j in group)
        width = kept + new
        ids = torch.full((len(group), new), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, j in enumerate(group):
            fed = j.input_ids[j.cached_tokens:]
            ids[i, new - len(fed):] = torch.tensor(fed)
            mask[i, width - len(j.input_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, kept:]
        cache = self._cache_from_prefixes(group, kept, new)
        started = time.perf_counter()
        logits = self._forward(ids, mask, positions, cache)
        self._remember(group, cache)
        rows = self._new_rows(group, started)
        counts = [self.rows_of(job) for job in group]
        if any(n > 1 for n in counts):
            # Sequences of one prompt share its prefill: repeat the rows after it.
            index = torch.arange(len(group), device=self.device).repeat_interleave(
                torch.tensor(counts, device=self.device))
            cache.reorder_cache(index)
            logits, mask = logits.index_select(0, index), mask.index_select(0, index)
        tokens = self._choose(rows, logits)
        done = self._accept(rows, tokens, logits)
        keep = [i for i in range(len(rows)) if i not in done]
        next_pos = mask.sum(dim=1)
        if keep:
            index = torch.tensor(keep, device=self.device)
            if len(keep) < len(rows):
                cache.reorder_cache(index)
            self._merge(cache, mask.index_select(0, index), next_pos.index_select(0, index),
                        tokens.index_select(0, index), [rows[i] for i in keep])
        yield from self._results([rows[i] for i in done])

    def _cache_from_prefixes(self, group: list[Job], kept: int, room: int) -> DynamicCache:
        """A cache holding each job's reused prefix, right-aligned in `kept` columns, with
        `room` columns for the tokens it feeds (empty when no job reuses any)."""
        cache = _new_cache(self.lm)
        if not kept:
            return cache
        ref = next(j.reuse[0] for j in group if j.cached_tokens)

        def parts(layer: int, which: str) -> list[torch.Tensor]:
            return [getattr(j.reuse[0] if j.cached_tokens else ref, which)[layer][None, :, :j.cached_tokens]
                    for j in group]

        cache.layers = [_Layer(_pack(parts(i, "keys"), kept, room), _pack(parts(i, "values"), kept, room), kept)
                        for i in range(len(ref.keys))]
        for j in group:
            if j.cached_tokens:
                self.prefixes.count(j.cached_tokens)
        return cache

    def _remember(self, group: list[Job], cache: DynamicCache) -> None:
        """Count the prompt tokens fed, and keep each prompt's keys and values for later ones."""
        self.prefilled_tokens += sum(len(j.input_ids) - j.cached_tokens for j in group)
        if self.prefixes is None:
            return
        for i, j in enumerate(group):
            n = len(j.input_ids)
            self.prefixes.store(j.input_ids, [layer.keys[i, :, -n:] for layer in cache.layers],
                                [layer.values[i, :, -n:] for layer in cache.layers])

    def _new_rows(self, group: list[Job], started: float) -> list[_Row]:
        rows = []
        deadline = started + self.s.max_time if self.s.max_time else None
        for job in group:
            states = [
                SequenceState(self.lm.tokenizer, self.s.eos_ids, job.max_new_tokens, job.stop_strings)
                for _ in range(self.n)
            ]
            active = _Active(job, self.n, states, started, deadline)
            for k, state in enumerate(states):
                gen = row_generator(job.seed, k) if self.s.do_sample else None
                history = list(job.input_ids) if self.uses_history else []
                rows.append(_Row(active, state, gen, history, self.matchers.new()))
                active.matchers.append(rows[-1].matcher)
                active.alternatives.append(rows[-1].alternatives)
        return rows

    def _merge(self, cache, mask, next_pos, last, rows) -> None:
        """Add prefilled rows to the running batch, right-aligned to a common width."""
        width = mask.shape[1] if not self.rows else max(self.mask.shape[1], mask.shape[1])
        old_layers = self.cache.layers if self.rows else [None] * len(cache.layers)
        self.rows = self.rows + rows
        spare = self._spare()
        layers = []
        for old, new in zip(old_layers, cache.layers):
            keys = [new.keys] if old is None else [old.keys, new.keys]
            values = [new.values] if old is None else [old.values, new.values]
            layers.append(_Layer(_pack(keys, width, spare), _pack(values, width, spare), width))
        if self.cache is None:
            self.cache = cache
        self.cache.layers = layers
        if len(self.rows) == len(rows):
            self.mask, self.next_pos, self.last = mask, next_pos, last
        else:
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.last = torch.cat([self.last, last])

    def _spare(self) -> int:
        """Columns the running rows may still add: enough that the buffers never regrow."""
        return max(r.state.max_new - len(r.state.ids) for r in self.rows) + 1

    # ------------------------------------------------------------------ decoding

    def _step(self) -> Iterator[JobResult]:
        """One decode step for every running row; finished rows leave the batch."""
        ones = self.mask.new_ones((len(self.rows), 1))
        self.mask = torch.cat([self.mask, ones], dim=1)
        logits = self._forward(self.last[:, None], self.mask, self.next_pos[:, None], self.cache)
        self.next_pos = self.next_pos + 1
        tokens = self._choose(self.rows, logits)
        done = self._accept(self.rows, tokens, logits)
        self.last = tokens
        self._expire_deadlines(done)
        if done:
            finished = [self.rows[i] for i in sorted(done)]
            self._drop(done)
            yield from self._results(finished)

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """Next-token logits (float32) of every row; genkit's decoder where it applies."""
        fast = self.fast
        if fast is not None:
            return fast.forward_transformers(ids, mask, positions, cache)[:, -1, :]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         **with_cache(self.model, cache), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].to(torch.float32)

    def _processors(self, prompt_length: int):
        # Only min_new_tokens depends on the prompt length; the rest are shared by every row.
        key = prompt_length if self.s.min_new_tokens else 0
        if key not in self._procs:
            self._procs[key] = procs.build_processors(self.s, prompt_length=key, **self._proc_kw)
        return self._procs[key]

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Next token per row: processors on each row's own history, then warpers, then the
        watermark, in generate()'s order."""
        scores = logits
        if self.uses_history:
            scores = torch.cat([
                self._processors(len(r.active.job.input_ids))(self._ids(r), logits[i:i + 1])
                for i, r in enumerate(rows)
            ])
        if self.matchers:
            scores = self.matchers.mask([r.matcher for r in rows], scores, logits)
        if self.warpers:
            scores = self.warpers(None, scores)
        if self.watermark:
            scores = torch.cat([self.watermark(self._ids(r), scores[i:i + 1]) for i, r in enumerate(rows)])
        self._scores = scores
        if self.s.do_sample:
            return sample_rows(torch.softmax(scores, dim=-1), [r.generator for r in rows])
        return scores.argmax(dim=-1)

    def _ids(self, row: _Row) -> torch.Tensor:
        return torch.tensor([row.history], dtype=torch.long, device=self.device)

    def _accept(self, rows: list[_Row], tokens: torch.Tensor, logits: torch.Tensor) -> set[int]:
        """Feed each row's token to its SequenceState; the indices of rows that finished."""
        ids = tokens.tolist()
        lps, top = None, None
        if self.want_logprobs:
            lps, top = processed_logprobs(self._scores, tokens, self.top_logprobs)
        now = time.perf_counter()
        done = set()
        for i, (row, t) in enumerate(zip(rows, ids)):
            if row.matcher is not None:
                self.matchers.consume(row.matcher, t)
            row.state.add([t], [lps[i]] if lps is not None else None)
            if top is not None:
                row.alternatives.append(top[i])
            if row.active.first_token_at is None:
                row.active.first_token_at = now
            if self.uses_history:
                row.history.append(t)
            if row.state.done:
                done.add(i)
        return done

    def _expire_deadlines(self, done: set[int]) -> None:
        if not self.s.max_time:
            return
        now = time.perf_counter()
        for i, row in enumerate(self.rows):
            if i not in done and row.active.deadline is not None and now >= row.active.deadline:
                row.state.finish("time")
                done.add(i)

    def _drop(self, done: set[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in done]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next_pos = self.last = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        self.last = self.last.index_select(0, index)
        # Columns that are padding for every remaining row would only cost attention time.
        first = int(self.mask.any(dim=0).to(torch.int8).argmax())
        self.mask = self.mask[:, first:]
        width, spare = self.mask.shape[1], self._spare()
        self.cache.layers = [
            _Layer(_pack([layer.keys[:, :, first:].index_select(0, index)], width, spare),
                   _pack([layer.values[:, :, first:].index_select(0, index)], width, spare), width)
            for layer in self.cache.layers
        ]

    def _results(self, finished: list[_Row]) -> Iterator[JobResult]:
        now = time.perf_counter()
        for row in finished:
            active = row.active
            active.rows_left -= 1
            if active.rows_left:
                continue
            seqs = [
                Sequence(st.text, list(st.ids), st.finish_reason or "cancelled",
                         list(st.logprobs) if self.want_logprobs else None,
                         self.matchers.complete(m, st.finish_reason),
                         list(alt) if self.top_logprobs else None)
                for st, m, alt in zip(active.states, active.matchers, active.alternatives)
            ]
            yield JobResult(active.job.handle, seqs, len(active.job.input_ids), active.started_at,
                            active.first_token_at, now)

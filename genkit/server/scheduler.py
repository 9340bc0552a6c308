"""The server's engine: one thread runs the model, and every request shares its batch.

Why one thread: a decode step already uses every core, and the model's caches are not safe to
touch from two threads. The HTTP side (asyncio) only submits `Work` and reads the events each
request receives through its `deliver` callable.

Greedy and sampling requests share one continuous batch (genkit.engine.continuous): a request
joins at the next step, leaves on the step it finishes, and a cancelled one (its client went
away) leaves before the next step, so its rows are free at once. Unlike `genkit batch`, rows of
one batch may carry different settings (temperature, penalties, n...): each request scores its
own rows. Other strategies (beam search, contrastive, DoLa, prompt lookup) run alone through
`Generation` between two steps of the batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from genkit.engine import Generation
from genkit.engine import constrain, continuous
from genkit.engine import processors as procs
from genkit.engine.core import row_generator
from genkit.engine.prefixes import PrefixCache
from genkit.engine.settings import DecodeSettings
from genkit.engine.strategies.base import processed_logprobs, sample_rows
from genkit.engine.tracker import Event, SequenceState
from genkit.errors import GenkitError


class Overloaded(Exception):
    """The queue of waiting requests is full."""


class Closing(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class Done:
    """The last thing a request receives: token counts, or the error that ended it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class Work:
    """One prompt to complete, as the engine needs it."""

    prompt: Any  # a string or chat messages, for the Generation path
    input_ids: list[int]
    settings: DecodeSettings
    seed: int
    max_new_tokens: int  # already fitted to the model's context
    system: str | None
    raw: bool
    deliver: Callable[[Event | Done], None]  # called on the engine thread; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # None: no log-probabilities; N: each token's and its N best alternatives


@dataclass
class _Plan:
    """How one request scores its rows."""

    processors: Any
    warpers: Any
    watermark: Any
    do_sample: bool
    matchers: Any  # constrain.PerRow: the request's grammar (falsy when unconstrained)
    logprobs: int | None  # alternatives per token when the request wants log-probabilities

    @property
    def plain_greedy(self) -> bool:
        return not (self.processors or self.warpers or self.watermark or self.do_sample or self.matchers
                    or self.logprobs is not None)


@dataclass
class _Job(continuous.Job):
    work: Work | None = None
    plan: _Plan | None = None


@dataclass
class _Row(continuous._Row):
    index: int = 0  # which of the request's n sequences
    sent_chars: int = 0
    sent_tokens: int = 0
    finish_sent: bool = False
    logprobs: list = field(default_factory=list)  # each accepted token's, when the request asked
    scored: tuple | None = None  # this step's (logprob, alternatives), from _choose to _accept


class ServingBatcher(continuous.ContinuousBatcher):
    """A continuous batch whose jobs each bring their own settings and receive events as
    their tokens are accepted."""

    def __init__(self, lm, base: DecodeSettings, *, batch_size: int, prefix_cache_bytes: int = 0):
        super().__init__(lm, base, batch_size=batch_size)
        self.uses_history = True  # each row keeps its ids: any request may need processors
        if prefix_cache_bytes > 0:
            self.prefixes = PrefixCache(prefix_cache_bytes)
        self.admitting: list[_Job] = []  # taken from the queue, not yet in the batch
        self.vocab = self.model.config.get_text_config().vocab_size

    def rows_of(self, job: _Job) -> int:
        return job.work.settings.num_return_sequences

    def job_for(self, work: Work) -> _Job:
        s = work.settings
        plan = _Plan(
            processors=procs.build_processors(s, prompt_length=len(work.input_ids), attention_mask=None,
                                              vocab_size=self.vocab, device=self.device),
            warpers=procs.build_warpers(s, device=self.device),
            watermark=procs.build_watermark(s, vocab_size=self.vocab, device=self.device),
            do_sample=s.do_sample,
            matchers=constrain.PerRow(self.lm, s, self.vocab),
            logprobs=work.logprobs,
        )
        return _Job(handle=work, input_ids=work.input_ids, seed=work.seed, max_new_tokens=work.max_new_tokens,
                    stop_strings=s.stop_strings, work=work, plan=plan)

    # ------------------------------------------------------------------ one turn of the loop

    def turn(self, waiting: deque, taken: Callable[[int], None]) -> list[tuple[Work, Done]]:
        """Drop cancelled rows, admit what fits from `waiting`, run one step; the requests
        that ended, each with its token counts. `taken(n)` hears of the n jobs admitted
        before their prefill streams a first token, so that a client that has seen a token
        never finds its request still counted as waiting."""
        finished = list(self._cancel_gone())
        if waiting and self._room_for(waiting[0]):
            self.admitting = self._take(waiting)
            taken(len(self.admitting))
            finished += self._admit(self.admitting)
            self.admitting = []
        if self.rows:
            finished += self._step()
        return finished

    def _room_for(self, job: _Job) -> bool:
        # A server admits at the next step: waiting for several free rows, as `genkit batch`
        # does for throughput, would add that wait to the request's latency.
        return not self.rows or self.batch_size - len(self.rows) >= self.rows_of(job)

    def _cancel_gone(self):
        gone = {i for i, r in enumerate(self.rows) if r.active.job.work.cancelled.is_set()}
        if not gone:
            return
        finished = [self.rows[i] for i in sorted(gone)]
        for row in finished:
            row.state.finish("cancelled")
        self._drop(gone)
        yield from self._results(finished)

    def reset(self) -> list[Work]:
        """Forget every running row (after an engine failure); the works they belonged to."""
        jobs = [r.active.job for r in self.rows] + self.admitting
        works = list({id(j.work): j.work for j in jobs}.values())
        self.rows, self.admitting = [], []
        self.cache = self.mask = self.next_pos = self.last = None
        return works

    # ------------------------------------------------------------------ per-request rows

    def _new_rows(self, group, started):
        rows = []
        for job in group:
            s = job.work.settings
            n = s.num_return_sequences
            deadline = started + s.max_time if s.max_time else None
            states = [SequenceState(self.lm.tokenizer, s.eos_ids, job.max_new_tokens, job.stop_strings)
                      for _ in range(n)]
            active = continuous._Active(job, n, states, started, deadline)
            for k, state in enumerate(states):
                gen = row_generator(job.seed, k) if s.do_sample else None
                row = _Row(active, state, gen, list(job.input_ids), job.plan.matchers.new(), index=k)
                active.matchers.append(row.matcher)
                rows.append(row)
        return rows

    def _choose(self, rows, logits):
        """Each request's processors, warpers and watermark on its own rows (generate()'s
        order); plain greedy rows of every request form one group, and the argmax of every
        greedy row is one call: a fixed cost per request and step is paid 16 times a step by
        16 clients at once."""
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(rows):
            plan = r.active.job.plan
            groups.setdefault("greedy" if plan.plain_greedy else id(r.active), []).append(i)
        done = []  # (row indices, their plan, their processed scores) per group
        for idx in groups.values():
            plan = rows[idx[0]].active.job.plan
            done.append((idx, plan, self._process(plan, rows, idx, logits)))
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [(idx, scores) for idx, plan, scores in done if not plan.do_sample]
        if greedy:
            where = torch.tensor([i for idx, _ in greedy for i in idx], device=logits.device)
            out[where] = torch.cat([scores for _, scores in greedy]).argmax(dim=-1)
        for idx, plan, scores in done:
            where = torch.tensor(idx, device=logits.device)
            if plan.do_sample:
                out[where] = sample_rows(torch.softmax(scores, dim=-1), [rows[i].generator for i in idx])
            if plan.logprobs is not None:
                self._score(rows, idx, scores, out.index_select(0, where), plan.logprobs)
        return out

    def _process(self, plan: _Plan, rows, idx: list[int], logits):
        """The scores one group's rows choose from."""
        where = torch.tensor(idx, device=logits.device)
        scores = logits.index_select(0, where) if len(idx) < len(rows) else logits
        if plan.processors:
            scores = self._apply(plan.processors, rows, idx, scores)
        if plan.matchers:
            scores = plan.matchers.mask([rows[i].matcher for i in idx], scores, logits.index_select(0, where))
        if plan.warpers:
            scores = plan.warpers(None, scores)
        if plan.watermark:
            scores = self._apply(plan.watermark, rows, idx, scores)
        return scores

    def _apply(self, processors, rows, idx: list[int], scores):
        """Processors on a request's rows: in one call when their histories have one length
        (a request's rows step together), each called directly (LogitsProcessorList inspects
        every processor's signature on every call)."""
        if len({len(rows[i].history) for i in idx}) > 1:
            return torch.cat([self._apply(processors, rows, [i], scores[j:j + 1]) for j, i in enumerate(idx)])
        ids = torch.tensor([rows[i].history for i in idx], dtype=torch.long, device=scores.device)
        for processor in processors:
            scores = processor(ids, scores)
        return scores

    @staticmethod
    def _score(rows, idx, scores, chosen, top: int) -> None:
        """The chosen tokens' log-probabilities (and `top` alternatives) under the scores they
        were chosen from, held on each row until _accept keeps them with its token."""
        lps, alternatives = processed_logprobs(scores, chosen, top)
        for j, i in enumerate(idx):
            rows[i].scored = (lps[j], alternatives[j] if alternatives is not None else [])

    def _results(self, finished):
        # Every row has streamed its own tokens already (_emit): a request only needs its
        # counts once its last row has left.
        for row in finished:
            active = row.active
            active.rows_left -= 1
            if not active.rows_left:
                tokens = sum(len(st.ids) for st in active.states)
                yield active.job.work, Done(len(active.job.input_ids), tokens, cached_tokens=active.job.cached_tokens)

    def _accept(self, rows, tokens, logits):
        # The base class feeds each row's token to its matcher before the stopping rules.
        done = super()._accept(rows, tokens, logits)
        for row in rows:
            if row.scored is not None:
                row.logprobs.append(row.scored[0])
                row.alternatives.append(row.scored[1])
                row.scored = None
            self._emit(row)
        return done

    def _expire_deadlines(self, done: set[int]) -> None:
        now = time.perf_counter()
        for i, row in enumerate(self.rows):
            if i not in done and row.active.deadline is not None and now >= row.active.deadline:
                row.state.finish("time")
                self._emit(row)
                done.add(i)

    def _emit(self, row: _Row) -> None:
        """The text and tokens a row added since its last event, and its finish."""
        st = row.state
        text, ids = st.text[row.sent_chars:], st.ids[row.sent_tokens:]
        finish = st.finish_reason if not row.finish_sent else None
        if not text and not ids and finish is None:
            return
        sent = slice(row.sent_tokens, len(st.ids))
        row.sent_chars, row.sent_tokens = len(st.text), len(st.ids)
        row.finish_sent = row.finish_sent or finish is not None
        scored = row.active.job.work.logprobs is not None
        row.active.job.work.deliver(Event(
            index=row.index, token_ids=list(ids), text=text, finish_reason=finish,
            logprobs=row.logprobs[sent] if scored else None, alternatives=row.alternatives[sent] if scored else None))


def batchable(settings: DecodeSettings) -> bool:
    """Whether a request's rows can join the shared batch (greedy or sampling, constrained or
    not: each row holds its own matcher)."""
    return settings.strategy in continuous.STRATEGIES


class Engine:
    """The engine thread and its bounded queue."""

    def __init__(self, lm, base: DecodeSettings, *, max_rows: int = 32, max_waiting: int = 64,
                 prefix_cache_bytes: int = 0):
        self.lm = lm
        self.max_waiting = max_waiting
        self.inbox: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self.waiting = 0  # submitted, not yet running
        self.lock = threading.Lock()
        self.closing = False
        self.batcher = (ServingBatcher(lm, base, batch_size=max_rows, prefix_cache_bytes=prefix_cache_bytes)
                        if continuous.supported(lm, base) else None)
        self.batch_queue: deque[_Job] = deque()
        self.solo_queue: deque[Work] = deque()
        self.thread = threading.Thread(target=self._loop, name="genkit-serve-engine", daemon=True)
        self.failure: str | None = None

    @property
    def running(self) -> int:
        """Rows in the batch now."""
        return len(self.batcher.rows) if self.batcher else 0

    def stats(self) -> dict:
        """What /health reports of the shared batch: prompt tokens prefilled, and the prefix cache."""
        if self.batcher is None:
            return {}
        prefixes = self.batcher.prefixes
        return {"prefilled_tokens": self.batcher.prefilled_tokens,
                "prefix_cache": prefixes.stats() if prefixes is not None else None}

    def start(self) -> None:
        self.thread.start()

    def submit(self, works: list[Work]) -> None:
        """Queue a request's works, all or none."""
        with self.lock:
            if self.closing:
                raise Closing()
            if self.waiting + len(works) > self.max_waiting:
                raise Overloaded()
            self.waiting += len(works)
        for w in works:
            self.inbox.put(w)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel whatever is still running and stop the thread."""
        with self.lock:
            self.closing = True
        self.inbox.put(None)  # wakes an idle loop
        self.thread.join(timeout)

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                idle = not self.batch_queue and not self.solo_queue and not self.running
                if not self._collect(block=idle):
                    break
                self._forget_cancelled()
                if self.solo_queue:
                    self._taken(1)
                    self._run_alone(self.solo_queue.popleft())
                    continue
                if self.batcher and (self.batch_queue or self.batcher.rows):
                    self._batch_turn()
        self._cancel_everything()

    def _collect(self, block: bool) -> bool:
        """Move submitted works into the queues; False once closing (the loop ends)."""
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return not self.closing
        while item is not None:
            self._route(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
        return not self.closing

    def _route(self, work: Work) -> None:
        if self.batcher is not None and batchable(work.settings):
            self.batch_queue.append(self.batcher.job_for(work))
        else:
            self.solo_queue.append(work)

    def _taken(self, count: int) -> None:
        with self.lock:
            self.waiting -= count

    def _forget_cancelled(self) -> None:
        for q, work_of in ((self.batch_queue, lambda j: j.work), (self.solo_queue, lambda w: w)):
            gone = [x for x in q if work_of(x).cancelled.is_set()]
            for x in gone:
                q.remove(x)
                work_of(x).deliver(Done(error="cancelled"))
            self._taken(len(gone))

    def _batch_turn(self) -> None:
        try:
            results = self.batcher.turn(self.batch_queue, self._taken)
        except Exception as e:  # one failed step must not take the server down
            for work in self.batcher.reset():
                work.deliver(Done(error=f"generation failed: {type(e).__name__}: {e}"))
            return
        for work, done in results:
            work.deliver(done)

    def _run_alone(self, work: Work) -> None:
        gen = Generation(self.lm, [work.prompt], work.settings, system=work.system, raw=work.raw,
                         seeds=[work.seed], logprobs=work.logprobs)
        events = iter(gen)
        try:
            for ev in events:
                if work.logprobs is not None and ev.token_ids:
                    # Generation keeps each sequence's alternatives, up to this event's tokens.
                    kept = gen.alternatives.get(ev.index, [])
                    ev.alternatives = (kept[len(kept) - len(ev.token_ids):] if len(kept) >= len(ev.token_ids)
                                       else [[] for _ in ev.token_ids])
                work.deliver(ev)
                if work.cancelled.is_set() or self.closing:
                    events.close()
                    break
        except GenkitError as e:
            work.deliver(Done(error=e.message))
            return
        except Exception as e:
            work.deliver(Done(error=f"generation failed: {type(e).__name__}: {e}"))
            return
        work.deliver(Done(gen.stats.prompt_tokens, gen.stats.completion_tokens))

    def _cancel_everything(self) -> None:
        works = [j.work for j in self.batch_queue] + list(self.solo_queue)
        if self.batcher:
            works += self.batcher.reset()
        for work in works:
            work.deliver(Done(error="the server is shutting down"))

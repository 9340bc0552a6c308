"""Beam search, beam-search multinomial sampling and diverse (group) beam search.

Every prompt keeps `num_beams` running hypotheses ("beams"). Each step scores every
continuation of every beam, keeps the best few, and moves the ones that end into a short list
of finished hypotheses. When the search is over, the best finished hypotheses of each prompt
are proposed at once: beam strategies cannot stream token by token, because a later step may
replace every beam of an earlier one.

The rules follow transformers' `generate()`, so that the same settings give the same tokens:

- Scores are log-probabilities: the processors (and warpers, watermark) run on
  `log_softmax(logits)`, and a beam's score is the sum of its processed token scores.
- Each step looks at `max(2, 1 + number of eos ids) * beams` candidates per prompt, so that
  enough of them do not end and the search can go on. Only the best `beams` of them (in
  candidate order) may finish; the best `beams` that do not end keep running.
- A finished hypothesis scores `sum / generated_tokens ** length_penalty`; the generated
  tokens include the eos token that ended it.
- `early_stopping`: True stops a prompt once it has `beams` finished hypotheses; False stops it
  when the best running beam, normalised at the current length, cannot beat the worst finished
  one; "never" does the same but, with a positive length penalty, normalises by the longest
  possible length (max_new_tokens), the only bound that is exact.
- At max_new_tokens (or max_time) every candidate among the best `beams` ends.

Diverse beam search (num_beam_groups > 1) splits the beams of a prompt into groups, each a
small beam search of its own with its own finished list. Groups take turns within a step; a
token that earlier groups chose at this step costs a later group `diversity_penalty` for each
time it was chosen (Hamming diversity). transformers 5 no longer ships it, so it follows
transformers 4.x exactly: the penalty is applied right after the sequence bias, a group that is
done feeds padding (which later groups see as chosen tokens), its stopping heuristic uses the
best candidate of the step, and at the length limit its running beams join its finished list
unless it is already done. A hypothesis that ends on any end token is returned ending on the
first one of the list, as 4.x returned it (plain beam search, in transformers 5 as in 4.x,
keeps the token that ended it). With one group it is the same search as plain beam search.

Beam sampling (do_sample with num_beams) draws the candidates without replacement in
proportion to the softmax of the candidates' scores, from each prompt's own seeded generator.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from genkit.engine.strategies.base import Context, Proposal

# A score that no real hypothesis reaches (transformers uses the same offset to rule out beams).
IMPOSSIBLE = -1.0e9


@dataclass
class Hypothesis:
    score: float  # normalised by length
    tokens: list[int]
    logprobs: list[float] | None = None
    alternatives: list[list[tuple[int, float]]] | None = None  # per token, with top_logprobs


@dataclass
class Finished:
    """The best finished hypotheses of one prompt (of one group, in diverse beam search)."""

    capacity: int
    items: list[Hypothesis] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    @property
    def worst(self) -> float:
        return min(h.score for h in self.items)

    def add(self, hyp: Hypothesis) -> None:
        # Hypotheses that no beam could reach (banned by a processor) never count as finished.
        if not math.isfinite(hyp.score) or hyp.score <= IMPOSSIBLE:
            return
        if self.full and not hyp.score > self.worst:
            return
        self.items.append(hyp)
        if len(self.items) > self.capacity:
            # Drop the worst; among equal scores the oldest goes first.
            worst = min(range(len(self.items)), key=lambda i: (self.items[i].score, i))
            del self.items[worst]


@dataclass
class Rules:
    """When hypotheses finish and when a prompt's search is over."""

    length_penalty: float
    early_stopping: bool | str
    max_new: int
    legacy: bool  # transformers 4.x group beam search bookkeeping (diverse beam search)

    def normalise(self, sums: torch.Tensor, generated: int) -> list[list[float]]:
        """Finished-hypothesis scores of summed log-probs (prompts, n) at `generated` tokens."""
        denominator = generated**self.length_penalty
        if self.legacy:
            # 4.x divided Python floats (double precision).
            return [[x / denominator for x in row] for row in sums.tolist()]
        # transformers 5 divides in float32: the same rounding makes the same comparisons.
        return (sums / denominator).tolist()

    def best_length(self, generated: int) -> int:
        """The length at which a running beam could score best, for the stopping heuristic."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            return self.max_new
        return generated

    def done(self, finished: Finished, best_running: torch.Tensor, best_candidate: float, generated: int) -> bool:
        """Whether a prompt's finished list can no longer change (after this step)."""
        if not finished.full:
            return False
        if self.early_stopping is True:
            return True
        length = self.best_length(generated)
        if self.legacy:
            # 4.x: Python floats, and the best candidate of the step, even one that just ended.
            return finished.worst >= best_candidate / length**self.length_penalty
        return not (best_running / (length**self.length_penalty)).item() > finished.worst


class Group:
    """The running beams of one beam group, for every prompt (prompt-major rows)."""

    def __init__(self, index: int, size: int, num_beams: int, num_prompts: int, rules: Rules, eos, device):
        self.size = size
        self.start = index * size  # first beam of the group within each prompt
        self.rules = rules
        self.eos = eos
        offsets = torch.arange(num_prompts, device=device)[:, None] * num_beams
        self.rows = (offsets + self.start + torch.arange(size, device=device)).reshape(-1)
        # Only the first beam starts alive, so the first step does not pick the same token per beam.
        self.scores = torch.full((num_prompts, size), IMPOSSIBLE, device=device)
        self.scores[:, 0] = 0.0
        self.finished = [Finished(size) for _ in range(num_prompts)]
        self.done = [False] * num_prompts

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def step(self, scores, search, generated, last, generators):
        """Choose this step's beams from processed scores (prompts * size, vocab).

        Returns, per row of the group, the row it continues and the token it appends."""
        prompts, vocab = len(self.done), scores.shape[-1]
        frozen = list(self.done)
        total = (scores.view(prompts, self.size, vocab) + self.scores[:, :, None]).view(prompts, -1)
        k = max(2, 1 + len(self.eos)) * self.size
        if generators is None:
            values, flat = total.topk(k, dim=1)
        else:
            values, flat = _sample_candidates(total, k, generators)
        beams, tokens = flat // vocab, flat % vocab
        ends = torch.isin(tokens, self.eos)
        if last and not self.rules.legacy:
            ends[:] = True
        self._collect(values, beams, tokens, ends, frozen, search, generated)
        # The best candidates that did not end keep running.
        running = values + ends.to(values.dtype) * IMPOSSIBLE
        self.scores, keep = running.topk(self.size, dim=1)
        # A running beam without a finite score (fewer allowed tokens than beams) is dead weight.
        self.live = torch.isfinite(self.scores)
        src = self.rows.view(prompts, self.size)[:, :1] + beams.gather(1, keep)
        new = tokens.gather(1, keep)
        self._update_done(values, frozen, generated)
        if last and self.rules.legacy:
            self._finalize_running(src, new, frozen, search, generated)
        # A prompt that was already done keeps its rows and is fed padding from now on.
        for p, was_done in enumerate(frozen):
            if was_done:
                src[p] = self.rows.view(prompts, self.size)[p]
                new[p] = search.pad
                self.live[p] = False
        return src.reshape(-1), new.reshape(-1)

    def _collect(self, values, beams, tokens, ends, frozen, search, generated):
        """Move the ending candidates among the best `size` into the finished lists."""
        normalised = self.rules.normalise(values, generated)
        for p, r in ends[:, : self.size].nonzero().tolist():
            if frozen[p]:
                continue
            row = p * search.num_beams + self.start + int(beams[p, r])
            token = int(tokens[p, r])
            if self.rules.legacy:
                # Only end tokens end a legacy hypothesis here. 4.x stored the hypothesis
                # without its end token and appended the first end token of the list when
                # it returned it, whichever one had ended it.
                token = int(self.eos[0])
            self.finished[p].add(search.hypothesis(row, token, normalised[p][r]))

    def _update_done(self, values, frozen, generated):
        best_candidate = values.max(dim=1).values.tolist()
        for p in range(len(self.done)):
            if not frozen[p]:
                self.done[p] = self.rules.done(self.finished[p], self.scores[p, 0], best_candidate[p], generated)

    def _finalize_running(self, src, new, frozen, search, generated):
        """4.x bookkeeping at the length limit: running beams of unfinished groups join the list."""
        normalised = self.rules.normalise(self.scores, generated)
        for p in range(len(self.done)):
            if frozen[p] or self.done[p]:
                continue
            for j in range(self.size):
                self.finished[p].add(search.hypothesis(int(src[p, j]), int(new[p, j]), normalised[p][j]))


def _sample_candidates(total, k, generators):
    """`k` distinct candidates per prompt, drawn without replacement with probability
    softmax(total), each prompt from its own generator."""
    probs = torch.softmax(total, dim=-1)
    picks = []
    for p, gen in enumerate(generators):
        alive = int((probs[p] > 0).sum())
        # The generators live on the CPU (a seed gives the same draws on any device): draw there.
        idx = torch.multinomial(probs[p].to(gen.device), min(k, alive), replacement=False, generator=gen)
        idx = idx.to(total.device)
        if alive < k:
            # The warpers left too few tokens: fill up with candidates that cannot win.
            rest = total[p].clone()
            rest[idx] = -math.inf
            idx = torch.cat([idx, rest.topk(k - alive).indices])
        picks.append(idx)
    flat = torch.stack(picks)
    return total.gather(1, flat), flat


class Search:
    """The state shared by the groups: sequences of every row, and how to score them."""

    def __init__(self, ctx: Context):
        s = ctx.settings
        self.ctx = ctx
        self.num_beams = s.num_beams
        groups = s.num_beam_groups if s.strategy == "diverse-beam" else 1
        self.size = self.num_beams // groups
        self.pad = s.pad_id
        self.diversity = s.diversity_penalty if groups > 1 else 0.0
        self.prompt_length = ctx.input_ids.shape[1]
        rules = Rules(s.length_penalty, s.early_stopping, ctx.tracker.seqs[0].max_new, s.strategy == "diverse-beam")
        eos = torch.tensor(s.eos_ids, dtype=torch.long, device=ctx.input_ids.device)
        self.groups = [
            Group(g, self.size, self.num_beams, ctx.num_prompts, rules, eos, ctx.input_ids.device)
            for g in range(groups)
        ]
        self.processors = _per_row(ctx.processors, self.size)
        self.generators = ctx.generators if s.do_sample else None
        self.ids = None  # (prompts * beams, length): every row's sequence, prompt included
        # With log-probabilities asked: each row's tokens' log-probabilities (prompts * beams,
        # generated) under the processed distributions they were chosen from, their `top`
        # alternatives per row, and this step's processed log-probabilities (rows, vocab).
        self.top = ctx.top_logprobs
        self.logprobs = None
        self.alternatives: list[list] | None = None
        self.step_logprobs = None
        self.live = None  # (prompts * beams,) bool: rows whose new token extends a live beam

    def hypothesis(self, row: int, token: int, score: float) -> Hypothesis:
        """Row `row`'s generated tokens followed by `token`, as a finished hypothesis."""
        tokens = self.ids[row, self.prompt_length:].tolist() + [token]
        lps = alts = None
        if self.logprobs is not None:
            lps = self.logprobs[row].tolist() + [self.step_logprobs[row, token].item()]
            if self.alternatives is not None:
                alts = self.alternatives[row] + [self._top(self.step_logprobs[row : row + 1])[0]]
        return Hypothesis(score, tokens, lps, alts)

    def _top(self, logprobs: torch.Tensor) -> list[list[tuple[int, float]]]:
        """The `top` most likely tokens of each row of processed log-probabilities."""
        values, ids = logprobs.topk(min(self.top, logprobs.shape[-1]), dim=-1)
        return [[(i, v) for i, v in zip(r_ids, r_values) if v != float("-inf")]
                for r_ids, r_values in zip(ids.tolist(), values.tolist())]

    def extend_logprobs(self, src: torch.Tensor, new: torch.Tensor) -> None:
        """The rows continue `src`'s with the tokens `new`: their log-probabilities follow."""
        if self.logprobs is None:
            return
        self.logprobs = torch.cat([self.logprobs[src], self.step_logprobs[src, new][:, None]], dim=-1)
        if self.alternatives is not None:
            tops = self._top(self.step_logprobs[src])
            self.alternatives = [self.alternatives[s] + [top] for s, top in zip(src.tolist(), tops)]

    def score(self, group: Group, log_probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Processed scores of one group's rows; `chosen` holds this step's tokens of earlier groups."""
        single = len(self.groups) == 1
        ids = self.ids if single else self.ids[group.rows]
        scores = log_probs if single else log_probs[group.rows]
        procs = self.processors
        # transformers 4.x applied the diversity penalty right after the sequence bias.
        head = 1 if procs and isinstance(procs[0], SequenceBiasLogitsProcessor) else 0
        scores = LogitsProcessorList(procs[:head])(ids, scores)
        if group.start > 0 and self.diversity:
            scores = scores - self._diversity(chosen[:, : group.start], scores.shape[-1])
        scores = LogitsProcessorList(procs[head:])(ids, scores)
        if self.ctx.constraint is not None:
            # Each beam's own matcher masks its row, after the processors and before the warpers.
            rows = None if single else group.rows.tolist()
            scores = self.ctx.constraint.mask(scores, rows, fallback=log_probs if single else log_probs[group.rows])
        scores = self.ctx.warpers(ids, scores)
        return self.ctx.watermark(ids, scores)

    def _diversity(self, earlier: torch.Tensor, vocab: int) -> torch.Tensor:
        """Penalty per (row, token): diversity_penalty times how often earlier groups chose it."""
        counts = torch.stack([torch.bincount(row, minlength=vocab) for row in earlier])
        return (self.diversity * counts).repeat_interleave(self.size, dim=0)

    def step(self, log_probs: torch.Tensor, generated: int, last: bool):
        """One step of every group; returns the rows to continue and their new tokens."""
        n = log_probs.shape[0]
        src = torch.empty(n, dtype=torch.long, device=log_probs.device)
        new = torch.empty(n, dtype=torch.long, device=log_probs.device)
        chosen = new.view(-1, self.num_beams)
        if self.logprobs is not None:
            self.step_logprobs = torch.empty_like(log_probs)
        self.live = torch.empty(n, dtype=torch.bool, device=log_probs.device)
        for group in self.groups:
            scores = self.score(group, log_probs, chosen)
            if self.logprobs is not None:  # before the group's step, which may finish hypotheses
                self.step_logprobs[group.rows] = torch.log_softmax(scores.float(), dim=-1)
            src[group.rows], new[group.rows] = group.step(scores, self, generated, last, self.generators)
            self.live[group.rows] = group.live.reshape(-1)
        return src, new

    def results(self, count: int) -> list[Hypothesis]:
        """The best `count` finished hypotheses of each prompt, prompt-major, best first."""
        out = []
        for p in range(self.ctx.num_prompts):
            hyps = [h for g in self.groups for h in g.finished[p].items]
            # Best first; on equal scores the later one first (as transformers 4.x sorted them).
            ranked = sorted(hyps, key=lambda h: h.score)[::-1] if len(self.groups) > 1 else _best_first(hyps)
            ranked += self._running(p)  # only if stopped before any hypothesis finished
            out.extend(ranked[:count])
        return out

    def _running(self, p: int) -> list[Hypothesis]:
        """Prompt p's running beams (of the first group), unscored."""
        group = self.groups[0]
        rows = group.rows.view(self.ctx.num_prompts, -1)[p].tolist()
        return [Hypothesis(IMPOSSIBLE, self.ids[r, self.prompt_length:].tolist()) for r in rows]


def _best_first(hyps: list[Hypothesis]) -> list[Hypothesis]:
    return sorted(hyps, key=lambda h: -h.score)


def _per_row(processors: LogitsProcessorList, beams: int) -> LogitsProcessorList:
    """The request's processors for `beams` rows per prompt: state kept per prompt (the left
    padding the repetition penalty ignores) is repeated for each beam."""
    out = LogitsProcessorList()
    for proc in processors:
        ignore = getattr(proc, "prompt_ignore_length", None)
        if isinstance(proc, RepetitionPenaltyLogitsProcessor) and isinstance(ignore, torch.Tensor):
            proc = copy.copy(proc)
            proc.prompt_ignore_length = ignore.repeat_interleave(beams)
        out.append(proc)
    return out


def decode(ctx: Context):
    search = Search(ctx)
    runner = ctx.runner
    # Every beam is a row of its own from the start, as in generate(): the prompts are repeated
    # before the prefill, which keeps the logits bit-identical to transformers'.
    runner.repeat_interleave(search.num_beams)
    runner.prompt = runner.prompt.repeat_interleave(search.num_beams, dim=0)
    search.ids = runner.prompt
    if ctx.constraint is not None:  # one matcher per beam, as one row per beam
        ctx.constraint.reorder([p for p in range(ctx.num_prompts) for _ in range(search.num_beams)])
    if ctx.want_logprobs:
        search.logprobs = search.ids.new_zeros((search.ids.shape[0], 0), dtype=torch.float32)
        search.alternatives = [[] for _ in range(search.ids.shape[0])] if ctx.top_logprobs else None
    max_new = search.groups[0].rules.max_new
    out = runner.prefill()
    generated = 0
    while True:
        generated += 1
        log_probs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        last = generated >= max_new or ctx.tracker.timed_out()
        src, new = search.step(log_probs, generated, last)
        if last or all(g.all_done for g in search.groups):
            break
        runner.select(src)
        if ctx.constraint is not None:  # the matchers follow their beams
            ctx.constraint.advance(src.tolist(), new.tolist(), search.live.tolist())
        search.ids = torch.cat([search.ids[src], new[:, None]], dim=-1)
        search.extend_logprobs(src, new)
        out = runner.step(new[:, None])
    best = search.results(ctx.settings.num_return_sequences)
    if ctx.constraint is not None:  # completeness is asked of the returned hypotheses, not of beams
        ctx.constraint.replay([h.tokens for h in best])
    lps = [h.logprobs for h in best] if ctx.want_logprobs else None
    if lps is not None and any(x is None for x in lps):
        lps = None
    alts = [h.alternatives for h in best] if lps is not None and ctx.top_logprobs else None
    if alts is not None and any(x is None for x in alts):
        alts = None
    yield Proposal([h.tokens for h in best], lps, alts)

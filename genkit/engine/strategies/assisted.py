"""Assisted (speculative) decoding and prompt-lookup decoding.

Both strategies guess several tokens cheaply and let the target model check all the guesses in
one forward pass; a forward over k+1 tokens costs about as much as over one when decoding is
bound by reading the weights, so every accepted guess is a token for free.

- assisted: a small draft model with the same vocabulary proposes `num_assistant_tokens`
  tokens. With the "heuristic" schedule the draft grows by 2 after a fully accepted draft and
  shrinks by 1 otherwise (never below 1); "constant" keeps it fixed.
- prompt-lookup: no draft model. The draft is what followed the latest earlier occurrence of the
  sequence's last n-gram (n from `max_matching_ngram_size`, default 2, down to 1), up to
  `prompt_lookup_num_tokens` tokens. It shines when the answer quotes or edits the prompt.

Verification keeps the target's output distribution exactly:
- greedy: the draft is accepted up to the first token that differs from the target's own
  choice, and the target's choice at that position is emitted too, so the text equals plain
  greedy decoding.
- sampling with a draft model: speculative sampling (Leviathan et al. 2023, algorithm 1). Draft
  token x, drawn from the draft's distribution q, is kept with probability min(1, p(x)/q(x));
  at the first rejection a token is drawn from norm(max(0, p - q)); after a fully accepted draft
  one more token is drawn from p.
- sampling with prompt lookup (a draft without probabilities): each position is sampled from p
  in turn and the draft is kept while the samples agree with it; the random draws are the same
  as plain sampling's, so a seed gives the same text as plain sampling.

Logits processors, warpers and the watermark apply to the target's logits at every position,
and to the draft model's logits while it drafts, as transformers' generate() does.

Batches: transformers supports batch size 1 only here. genkit runs each row as its own batch of
one (its own caches, unpadded prompt, draft length and random generator) and advances all rows
one draft-and-verify cycle per proposal, so rows accept independently and a seeded row gives
the same text alone or in a batch. The price is one forward per row instead of one per batch:
this strategy is for latency, batches of plain greedy or sampling are for throughput.

Differences from transformers, all without effect on greedy output: prompt lookup takes the
latest match rather than the first, and keeps an end-of-sequence token in the draft (the
tracker stops there); the assistant drafts exactly `num_assistant_tokens` tokens (no
confidence threshold); the heuristic schedule starts afresh with every request.
"""

from __future__ import annotations

import torch

from genkit.engine import constrain
from genkit.engine import processors as procs
from genkit.engine.strategies.base import Context, Proposal, processed_logprobs
from genkit.errors import GenkitError

HEURISTIC_SCHEDULES = ("heuristic", "heuristic_transient")


# ---------------------------------------------------------------- checks


def check_assistant(lm, assistant) -> None:
    """Assisted decoding compares token ids and probabilities position by position, so the
    draft model must share the target's vocabulary exactly."""
    if assistant is None:
        raise GenkitError("assisted decoding needs a draft model: pass --assistant-model (a smaller model "
                          "with the same tokenizer) or use prompt lookup (--prompt-lookup-num-tokens)")
    if lm.is_encoder_decoder or assistant.is_encoder_decoder:
        raise GenkitError("assisted decoding works with decoder-only models only (target and assistant)")
    target_size = lm.model.config.get_text_config().vocab_size
    draft_size = assistant.model.config.get_text_config().vocab_size
    where = f"assistant model '{assistant.name}' and model '{lm.name}'"
    if target_size != draft_size:
        raise GenkitError(f"{where} have different vocabularies ({draft_size} vs {target_size} tokens): "
                          "the assistant must use the same tokenizer")
    if assistant.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
        raise GenkitError(f"{where} have different tokenizers (same size, different tokens): "
                          "the assistant must use the same tokenizer")


def _assistant(ctx: Context):
    """The draft model: loaded by the caller (api.stream, the CLI), else loaded here."""
    assistant = ctx.extras.get("assistant")
    if assistant is None and ctx.settings.assistant_model:
        from genkit import models

        dtype = str(ctx.model.dtype).replace("torch.", "")
        assistant = models.load(ctx.settings.assistant_model, models.LoadOptions(dtype=dtype))
    check_assistant(ctx.lm, assistant)
    return assistant


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from `probs` (vocab,) with the row's own generator (a CPU generator: the
    distribution moves to it, a no-op on the CPU)."""
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------- drafters


def rollback_ready(runner):
    """The runner, its cache told to keep what it would drop until the next crop: transformers'
    sliding-window layers (Gemma 2 / 3) forget keys that leave the window, and a rejected draft
    is rolled back by cropping, which they then refuse. genkit's own cache keeps everything."""
    cache = getattr(runner, "cache", None)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return runner


class ModelDrafter:
    """Drafts with a small model over its own KV cache, which follows the row's sequence."""

    def __init__(self, draft, prompt: list[int], score, generator, sample: bool, eos_ids):
        ids = torch.tensor([prompt], device=draft.model.device)
        # The runner of the draft's own backend: genkit's decoder for a native GGUF draft, which
        # transformers' forward cannot call.
        self.runner = rollback_ready(draft.backend.runner(ids, torch.ones_like(ids)))
        self.started = False
        self.score = score  # (prefix token ids, logits) -> processed scores, on the target's device
        self.generator = generator
        self.sample = sample
        self.eos = set(eos_ids)

    def _catch_up(self, seq: list[int]) -> torch.Tensor:
        """Feed the tokens of `seq` the cache lacks; logits after the last one."""
        if not self.started:
            self.started = True
            out = self.runner.prefill()
            if self.runner.length == len(seq):
                return out.logits[0, -1]
        fresh = torch.tensor([seq[self.runner.length:]], device=self.runner.device)
        return self.runner.step(fresh).logits[0, -1]

    def propose(self, seq: list[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to k draft tokens, and for sampling the draft distributions q (k, vocab)."""
        if k < 1:
            return [], None
        logits = self._catch_up(seq)
        draft, dists = [], []
        while True:
            scores = self.score(seq + draft, logits)
            if self.sample:
                q = torch.softmax(scores, dim=-1)
                token = draw(q, self.generator)
                dists.append(q)
            else:
                token = int(scores.argmax())
            draft.append(token)
            if len(draft) == k or token in self.eos:
                break
            logits = self.runner.step(torch.tensor([[token]], device=self.runner.device)).logits[0, -1]
        return draft, torch.stack(dists) if dists else None

    def agree(self, length: int) -> None:
        """Only the first `length` tokens the cache holds are still part of the sequence."""
        if self.runner.length > length:
            self.runner.crop(length)


class LookupDrafter:
    """Drafts by copying what followed the latest earlier occurrence of the last n-gram."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram

    def propose(self, seq: list[int], k: int) -> tuple[list[int], None]:
        return lookup_draft(seq, k, self.max_ngram), None

    def agree(self, length: int) -> None:
        pass


def lookup_draft(seq: list[int], k: int, max_ngram: int) -> list[int]:
    """The continuation (at most k tokens) of the latest earlier match of seq's last n-gram,
    trying the longest n first; [] when nothing matches."""
    if k < 1:
        return []
    end = len(seq)
    for n in range(min(max_ngram, end - 1), 0, -1):
        tail = seq[end - n:]
        # A match must end before the last token so that it has a continuation.
        for start in range(end - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


# ---------------------------------------------------------------- one row


class Row:
    """One output sequence: its target cache, drafter, processors and draft length."""

    def __init__(self, ctx: Context, index: int, drafter_factory, draft_len: int, schedule: str = "constant"):
        s = ctx.settings
        keep = ctx.attention_mask[index].bool()
        self.prompt = ctx.input_ids[index][keep].tolist()
        self.index = index
        self.device = ctx.input_ids.device
        ids = torch.tensor([self.prompt], device=self.device)
        self.target = rollback_ready(ctx.lm.backend.runner(ids, torch.ones_like(ids)))
        # Built per row: the processors' view of "the prompt" (its length, its padding) must be
        # this row's unpadded prompt, not the batch's.
        self.processors = procs.build_processors(
            s, prompt_length=len(self.prompt), attention_mask=torch.ones_like(ids),
            vocab_size=ctx.model.config.get_text_config().vocab_size, device=self.device,
        )
        self.warpers, self.watermark = ctx.warpers, ctx.watermark
        self.processing = len(self.processors) + len(self.warpers) + len(self.watermark) > 0
        self.generator = ctx.generators[index] if ctx.generators is not None else None
        self.sample = bool(s.do_sample)
        self.seq = list(self.prompt)
        self.draft_len = draft_len
        self.schedule = schedule
        width = ctx.model.config.get_text_config().vocab_size
        self.grammar = None if ctx.constraint is None else constrain.Draft(ctx.constraint, index, width, self.device)
        self.drafter = drafter_factory(self)
        self.drafted = self.accepted = 0
        self.verified: list[torch.Tensor] = []  # this cycle's processed scores, one per position checked

    def score(self, prefix: list[int], logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Processors, the grammar's mask (`allowed`), warpers and watermark in generate()'s
        order for the token after `prefix`; `logits` is (vocab,)."""
        if not self.processing and allowed is None:
            return logits
        ids = torch.tensor([prefix], device=self.device)
        logits = logits.to(self.device)[None]
        scores = self.processors(ids, logits)
        if allowed is not None:
            scores = constrain.apply(scores, allowed[None], fallback=logits)
        scores = self.warpers(ids, scores)
        return self.watermark(ids, scores)[0]

    def _scored(self, prefix: list[int], logits: torch.Tensor, allowed=None) -> torch.Tensor:
        """`score` for the target at a verification position, kept (`self.verified`): the
        distributions the kept tokens were chosen from, for their log-probabilities."""
        scores = self.score(prefix, logits, allowed)
        self.verified.append(scores)
        return scores

    def draft_score(self, prefix: list[int], logits: torch.Tensor) -> torch.Tensor:
        """`score` for the draft model: with a grammar, the draft so far is consumed
        tentatively, so the draft model proposes only tokens the grammar allows."""
        if self.grammar is None:
            return self.score(prefix, logits)
        j = len(prefix) - len(self.seq)
        self.grammar.push(prefix[len(self.seq) + self.grammar.pending:])
        return self.score(prefix, logits, self.grammar.mask(j))

    def _allowed(self, j: int) -> torch.Tensor | None:
        return None if self.grammar is None else self.grammar.mask(j)

    def _pick(self, prefix: list[int], logits: torch.Tensor, allowed=None) -> tuple[int, torch.Tensor]:
        """The target's own token at one position, and its processed distribution (sampling)."""
        scores = self._scored(prefix, logits, allowed)
        if not self.sample:
            return int(scores.argmax()), scores
        p = torch.softmax(scores, dim=-1)
        return draw(p, self.generator), p

    def first(self) -> list[int]:
        """The first token, from the prompt alone (no draft yet: it arrives as fast as plain
        decoding's first token)."""
        logits = self.target.prefill().logits[0, -1]
        self.verified = []
        token, _ = self._pick(self.seq, logits, self._allowed(0))
        if self.grammar is not None:
            self.grammar.settle(0, token)
        self.seq.append(token)
        return [token]

    def cycle(self, remaining: int) -> list[int]:
        """Draft, verify in one target forward, keep what the target agrees with."""
        # The target always adds one token of its own, so a longer draft would be wasted.
        k = min(self.draft_len, remaining - 1)
        draft, q = self.drafter.propose(self.seq, k)
        if self.grammar is not None:
            # Only the draft's allowed prefix can be accepted (the target's masked distributions
            # give the rest probability 0): keep that much, consumed tentatively.
            kept = self.grammar.push(draft[self.grammar.pending:])
            draft, q = draft[:kept], (q[:kept] if q is not None else None)
        start = len(self.seq)
        self.verified = []
        fresh = torch.tensor([self.seq[self.target.length:] + draft], device=self.device)
        logits = self.target.step(fresh).logits[0, -(len(draft) + 1):]
        n, token = self._verify(draft, q, logits)
        if self.grammar is not None:
            self.grammar.settle(n, token)
        # Keep in the cache what is now part of the sequence; the new token is fed next cycle.
        self.target.crop(start + n)
        self.drafter.agree(start + n)
        self.seq.extend(draft[:n] + [token])
        self._adapt(len(draft), n)
        return draft[:n] + [token]

    def _verify(self, draft: list[int], q, logits: torch.Tensor) -> tuple[int, int]:
        """(accepted draft tokens, the token that follows them)."""
        for j, proposed in enumerate(draft):
            prefix = self.seq + draft[:j]
            if self.sample and q is not None:
                kept, token = self._speculative(prefix, proposed, q[j], logits[j], self._allowed(j))
                if not kept:
                    return j, token
                continue
            token, _ = self._pick(prefix, logits[j], self._allowed(j))
            if token != proposed:
                return j, token
        token, _ = self._pick(self.seq + draft, logits[len(draft)], self._allowed(len(draft)))
        return len(draft), token

    def _speculative(self, prefix, proposed: int, q: torch.Tensor, logits, allowed=None) -> tuple[bool, int]:
        """Keep `proposed` with probability min(1, p/q); else draw from norm(max(0, p - q))."""
        p = torch.softmax(self._scored(prefix, logits, allowed), dim=-1)
        q = q.to(p.device)
        r = float(torch.rand(1, generator=self.generator))
        if r * float(q[proposed]) <= float(p[proposed]):
            return True, proposed
        residual = torch.clamp(p - q, min=0)
        total = residual.sum()
        # p == q up to rounding leaves nothing to draw from; p itself is then the right law.
        dist = residual / total if total > 0 else p
        return False, draw(dist, self.generator)

    def _adapt(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if self.schedule in HEURISTIC_SCHEDULES and drafted:
            self.draft_len = self.draft_len + 2 if accepted == drafted else max(1, self.draft_len - 1)

    def logprobs(self, count: int, top: int):
        """(log-probabilities, `top` alternatives or None) of the last `count` tokens under the
        processed distributions the target chose them from (one per position this cycle checked:
        the accepted draft tokens and the target's own token)."""
        tokens = torch.tensor(self.seq[-count:], device=self.device)
        return processed_logprobs(torch.stack(self.verified[-count:]).to(self.device), tokens, top)


# ---------------------------------------------------------------- the strategy


def _rows(ctx: Context) -> list[Row]:
    s = ctx.settings
    if ctx.lm.is_encoder_decoder:
        raise GenkitError(f"{s.strategy} decoding works with decoder-only models only")
    if s.strategy == "assisted":
        assistant = _assistant(ctx)

        def drafter(row: Row):
            return ModelDrafter(assistant, row.prompt, row.draft_score, row.generator, row.sample, s.eos_ids)

        draft_len = s.num_assistant_tokens
    else:
        max_ngram = s.max_matching_ngram_size or 2

        def drafter(row: Row):
            return LookupDrafter(max_ngram)

        draft_len = s.prompt_lookup_num_tokens
    schedule = s.num_assistant_tokens_schedule if s.strategy == "assisted" else "constant"
    return [Row(ctx, i, drafter, draft_len, schedule) for i in range(ctx.input_ids.shape[0])]


def decode(ctx: Context):
    rows = _rows(ctx)
    n = len(rows)
    active = list(rows)
    first = True
    while active:
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] | None = [[] for _ in range(n)] if ctx.want_logprobs else None
        alternatives: list[list] | None = [[] for _ in range(n)] if ctx.want_logprobs and ctx.top_logprobs else None
        for row in active:
            state = ctx.tracker.seqs[row.index]
            new = row.first() if first else row.cycle(state.max_new - len(state.ids))
            tokens[row.index] = new
            if logprobs is not None:
                logprobs[row.index], top = row.logprobs(len(new), ctx.top_logprobs)
                if alternatives is not None:
                    alternatives[row.index] = top
        first = False
        yield Proposal(tokens, logprobs, alternatives)
        active = [r for r in active if not ctx.tracker.seqs[r.index].done]

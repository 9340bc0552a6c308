"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation").

Each step looks at the top_k most likely next tokens of every row and feeds all of them to the
model at once (rows are expanded k times in the KV cache). A candidate's score is

    (1 - penalty_alpha) * p(candidate)  -  penalty_alpha * max_j cos(h_candidate, h_j)

where h is the final layer's hidden state and j runs over the row's context (prompt and
generated tokens, padding excluded). The degeneration penalty punishes a candidate whose
representation repeats something already said. The winner's KV entries, logits and hidden
state are kept, so the next step needs no extra forward pass.

The steps and the padding rule follow transformers 4.55's contrastive search, whose token ids
tests/fixtures/contrastive_455.json records.
"""

from __future__ import annotations

import torch

from genkit.engine.strategies.base import Context, Proposal, processed_logprobs


def degeneration_penalty(context: torch.Tensor, context_mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Max cosine similarity of each candidate to its row's context.

    context (rows, length, hidden), context_mask (rows, length) with 0 at padding,
    candidates (rows, k, hidden) -> (rows, k).
    """
    ctx = context / context.norm(dim=-1, keepdim=True)
    cand = candidates / candidates.norm(dim=-1, keepdim=True)
    cosine = torch.matmul(cand, ctx.transpose(1, 2))  # (rows, k, length)
    # Padding positions carry no meaning (and their states can be anything, even NaN).
    cosine = cosine.masked_fill(context_mask[:, None, :] == 0, float("-inf"))
    return cosine.max(dim=-1).values


def rank(probs: torch.Tensor, penalty: torch.Tensor, alpha: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Index (rows,) of the best candidate; the first one wins a tie, as in 4.55. Candidates
    not `allowed` (a grammar forbids them: fewer allowed tokens than top_k) never win, even
    where a low degeneration penalty would outweigh their zero probability."""
    score = (1.0 - alpha) * probs - alpha * penalty
    if allowed is not None:
        score = score.masked_fill(~allowed, float("-inf"))
    return score.argmax(dim=-1)


def pick(t: torch.Tensor, k: int, choice: torch.Tensor) -> torch.Tensor:
    """From a tensor of rows * k expanded rows, the chosen expanded row of each row."""
    t = t.reshape(-1, k, *t.shape[1:])
    return t[torch.arange(t.shape[0], device=t.device), choice]


def decode(ctx: Context):
    s = ctx.settings
    alpha, k = float(s.penalty_alpha), int(s.top_k)
    runner = ctx.runner
    input_ids = ctx.input_ids
    rows = input_ids.shape[0]
    out = runner.prefill(hidden=True)
    logits = out.logits[:, -1, :]
    context = out.hidden_states[-1]  # (rows, prompt_length, hidden)
    context_mask = ctx.attention_mask.clone()
    while True:
        scores = ctx.score(input_ids, logits)
        probs = torch.softmax(scores, dim=-1)
        top_probs, top_ids = probs.topk(k, dim=-1)  # (rows, k)
        # With a grammar, the candidates are the top_k of the allowed tokens (masked to -inf).
        allowed = torch.isfinite(scores.gather(1, top_ids)) if ctx.constraint is not None else None
        # All k candidates of every row in one forward pass over a k-times expanded cache.
        runner.repeat_interleave(k)
        cand = runner.step(top_ids.reshape(-1, 1), hidden=True)
        cand_hidden = cand.hidden_states[-1][:, -1, :].reshape(rows, k, -1)
        choice = rank(top_probs, degeneration_penalty(context, context_mask, cand_hidden), alpha, allowed)
        tokens = top_ids.gather(1, choice[:, None]).squeeze(1)
        # The distribution the candidates were taken from (the choice among them also weighs
        # the degeneration penalty, which is not a distribution).
        lps, top = processed_logprobs(scores, tokens, ctx.top_logprobs) if ctx.want_logprobs else (None, None)
        # Keep only the winners' cache rows: the cache then holds the chosen token.
        runner.select(torch.arange(rows, device=choice.device) * k + choice)
        # Finished rows are fed padding in the ids the processors see, as in generate().
        live = ctx.unfinished()
        tokens = torch.where(live, tokens, torch.full_like(tokens, s.pad_id))
        ctx.consume(tokens.tolist(), live)
        yield Proposal([[t] for t in tokens.tolist()], [[x] for x in lps] if lps is not None else None,
                       [[a] for a in top] if top is not None else None)
        if ctx.tracker.all_done:
            return
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        logits = pick(cand.logits[:, -1, :], k, choice)
        context = torch.cat([context, cand_hidden[torch.arange(rows), choice][:, None, :]], dim=1)
        context_mask = torch.cat([context_mask, context_mask.new_ones((rows, 1))], dim=1)

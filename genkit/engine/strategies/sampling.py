"""Greedy decoding and multinomial sampling: one token per row per step."""

from __future__ import annotations

import torch

from genkit.engine.strategies.base import Context, Proposal, processed_logprobs, sample_rows


def pick(ctx: Context, scores: torch.Tensor) -> torch.Tensor:
    """The next token of every row from its processed scores."""
    if ctx.settings.do_sample:
        return sample_rows(torch.softmax(scores, dim=-1), ctx.generators)
    return scores.argmax(dim=-1)


def decode(ctx: Context):
    input_ids = ctx.input_ids
    pad = ctx.settings.pad_id
    out = ctx.runner.prefill()
    while True:
        logits = out.logits[:, -1, :]
        scores = ctx.score(input_ids, logits)
        tokens = pick(ctx, scores)
        # Finished rows keep receiving padding, as in generate(), so the batch stays rectangular.
        live = ctx.unfinished()
        tokens = torch.where(live, tokens, torch.full_like(tokens, pad))
        lps, top = processed_logprobs(scores, tokens, ctx.top_logprobs) if ctx.want_logprobs else (None, None)
        ids = tokens.tolist()
        ctx.consume(ids, live)
        yield Proposal([[t] for t in ids], [[x] for x in lps] if lps is not None else None,
                       [[a] for a in top] if top is not None else None)
        if ctx.tracker.all_done:
            return
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        out = ctx.runner.step(tokens[:, None])

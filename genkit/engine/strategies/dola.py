"""DoLa: Decoding by Contrasting Layers (Chuang et al., ICLR 2024).

Facts tend to emerge in the later layers of a transformer. DoLa reads the next-token
distribution of an early ("premature") layer as well as the final ("mature") one and decodes
from the difference of their log-probabilities, which amplifies what the late layers added.
Each step:

1. every candidate premature layer gets logits from the model's lm_head applied to its hidden
   state (no final norm in between: transformers 4.55 did it that way, and parity with it is
   what tests/fixtures/dola_455.json checks);
2. the candidate whose distribution is furthest from the final layer's, by the Jensen-Shannon
   style divergence of the DoLa reference code, is the premature layer of this step;
3. the adaptive plausibility constraint keeps only tokens whose final-layer probability is at
   least 0.1 times the top token's, and the next-token scores are
   log p_final - log p_premature over those tokens;
4. the request's logits processors (repetition_penalty 1.2 is advised) and, when sampling,
   the warpers act on those scores; then argmax or a draw.

As in 4.55, the premature layer of a step is chosen for the whole batch (the divergence is
averaged over rows), so batched output matches 4.55's batched output.
"""

from __future__ import annotations

import math

import torch

from genkit.engine.dola_layers import layers_for
from genkit.engine.strategies.base import Context, Proposal, processed_logprobs
from genkit.engine.strategies.sampling import pick
from genkit.errors import GenkitError

RELATIVE_TOP = 0.1  # the paper's alpha for the adaptive plausibility constraint
# What an implausible token's premature log-prob becomes: any finite value works, since its
# final score is -inf; this is the one of the DoLa reference code.
IMPLAUSIBLE_BASE = -1e-3


FLOOR = -87.0  # exp(-87) = 1.6e-38, just above float32's smallest normal number


def divergence(final_logits: torch.Tensor, premature_logits: torch.Tensor) -> torch.Tensor:
    """Per candidate layer, the divergence of its distribution from the final one, averaged
    over the vocabulary and the batch: (layers, rows, vocab) -> (layers,).

    This is the quantity of the DoLa reference code (and 4.55): with M the mean of the two
    distributions, (KL(M || P_final) + KL(M || P_layer)) / 2. The argument order differs from the
    textbook Jensen-Shannon divergence, and it decides which layer wins, so it is kept."""
    logp_final = torch.log_softmax(final_logits, dim=-1)[None]
    logp_layers = torch.log_softmax(premature_logits, dim=-1)
    # Most of a 49k vocabulary has log-probabilities below -87, whose exp is a subnormal float:
    # x86 computes with those some 15x slower (6 ms instead of 0.4 per step here). Raised to the
    # smallest normal float, such a token adds about 1e-36 to a mean over the vocabulary: nothing.
    m = 0.5 * (logp_final.clamp_min(FLOOR).exp() + logp_layers.clamp_min(FLOOR).exp())
    m_log_m = m * m.log()  # m > 0 after the floor, so no 0 log 0 to guard
    kl_final = (m_log_m - m * logp_final).mean(-1)
    kl_layers = (m_log_m - m * logp_layers).mean(-1)
    return (0.5 * (kl_final + kl_layers)).mean(-1)


def contrast(final_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """log p_final - log p_base over the plausible tokens, -inf elsewhere."""
    final = torch.log_softmax(final_logits, dim=-1)
    base = torch.log_softmax(base_logits, dim=-1)
    threshold = final.max(dim=-1, keepdim=True).values + math.log(RELATIVE_TOP)
    implausible = final < threshold
    final = final.masked_fill(implausible, float("-inf"))
    base = base.masked_fill(implausible, IMPLAUSIBLE_BASE)
    return final - base


def dola_logits(lm_head, hidden_states, layers: list[int], final_logits: torch.Tensor | None):
    """The next-token scores of DoLa for the last position of every row, and the final logits.

    Without `final_logits` (a runner that skipped its head) they come from the last hidden
    state, which is already normed: one head product then serves every layer."""
    rows = [hidden_states[i][:, -1, :] for i in layers]
    if final_logits is None:
        rows.append(hidden_states[-1][:, -1, :])
    out = lm_head(torch.stack(rows)).to(torch.float32)  # (layers [+ 1], rows, vocab)
    if final_logits is None:
        out, final_logits = out[:-1], out[-1]
    best = 0 if len(layers) == 1 else int(divergence(final_logits, out).argmax())
    return contrast(final_logits, out[best]), final_logits


def decode(ctx: Context):
    layers = layers_for(ctx.model, ctx.settings.dola_layers)
    # The runner's model: genkit's decoder has its own head (one product for all candidate
    # layers at about 2.5x the speed of torch's for a few rows), transformers' the lm_head.
    lm_head = ctx.runner.model.get_output_embeddings()
    if lm_head is None:
        raise GenkitError("DoLa needs a model with an output embedding (lm_head)")
    pad = ctx.settings.pad_id
    input_ids = ctx.input_ids
    out = ctx.runner.prefill(hidden=True)
    while True:
        final = out.logits[:, -1, :] if out.logits is not None else None
        scores, final = dola_logits(lm_head, out.hidden_states, layers, final)
        # With a grammar, a row whose plausible tokens are all forbidden chooses among the
        # allowed ones by the final layer's scores (the contrast is -inf for all of them).
        processed = ctx.score(input_ids, scores, fallback=final)
        tokens = pick(ctx, processed)
        # Finished rows are fed padding and still count in the batch's layer choice, as in 4.55.
        live = ctx.unfinished()
        tokens = torch.where(live, tokens, torch.full_like(tokens, pad))
        ctx.consume(tokens.tolist(), live)
        lps, top = processed_logprobs(processed, tokens, ctx.top_logprobs) if ctx.want_logprobs else (None, None)
        yield Proposal([[t] for t in tokens.tolist()], [[x] for x in lps] if lps is not None else None,
                       [[a] for a in top] if top is not None else None)
        if ctx.tracker.all_done:
            return
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        out = ctx.runner.step(tokens[:, None], hidden=True, logits=False)

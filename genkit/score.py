"""`genkit score`: how likely a given text is under a model, token by token.

Each token after the first is scored by the model's log-probability of it given every token
before it (the raw distribution: no processors, no warpers, which belong to generation). The
first token has no context to be predicted from, unless the tokenizer puts a beginning-of-
sequence token before the text, which then serves as that context. The total is the sum over
the scored tokens and the perplexity exp(-total / scored tokens).
"""

from __future__ import annotations

import math

from genkit.errors import GenkitError


def score(lm, text: str) -> dict:
    import torch

    from genkit.logprobs import TokenText

    if lm.is_encoder_decoder:
        raise GenkitError("genkit score works with decoder-only models (this one is encoder-decoder)")
    ids = lm.tokenizer(text)["input_ids"]
    bos = lm.tokenizer.bos_token_id
    lead = 1 if ids and bos is not None and ids[0] == bos and len(ids) > 1 else 0  # BOS: context, not text
    if len(ids) - lead < 1:
        raise GenkitError("the text is empty: give some text to score")
    ctx = lm.context_length
    if ctx and len(ids) > ctx:
        raise GenkitError(f"the text is {len(ids)} tokens but the model's context holds {ctx}: shorten it")
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:], device=logits.device)[:, None])
    values = [None] + [float(v) for v in logp[:, 0].tolist()]
    texts = TokenText(lm.tokenizer)
    tokens = []
    for token_id, lp in zip(ids[lead:], values[lead:]):
        piece, raw = texts.lookup(token_id)
        tokens.append({"token": piece, "id": token_id, "bytes": raw, "logprob": None if lp is None else round(lp, 6)})
    scored = [v for v in values[lead:] if v is not None]
    total = sum(scored)
    return {
        "model": lm.name,
        "text": text,
        "tokens": tokens,
        "token_count": len(tokens),
        "scored_tokens": len(scored),
        "total_logprob": round(total, 6),
        "perplexity": round(math.exp(-total / len(scored)), 6) if scored else None,
    }

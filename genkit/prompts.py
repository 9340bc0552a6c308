"""From what the user typed to token ids: chat templates, raw text, padding."""

from __future__ import annotations

from typing import Any

from genkit.errors import GenkitError

Prompt = Any  # a string, or a list of chat messages ({"role": ..., "content": ...})


def uses_chat(lm, raw: bool) -> bool:
    return not raw and not lm.is_encoder_decoder and bool(getattr(lm.tokenizer, "chat_template", None))


def to_text(lm, prompt: Prompt, *, system: str | None = None, raw: bool = False) -> str:
    """The exact text the model sees: the chat template applied, unless raw or not a chat model."""
    if isinstance(prompt, list):
        messages = list(prompt)
        if not uses_chat(lm, raw):
            return "\n".join(str(m.get("content", "")) for m in messages)
    else:
        if not uses_chat(lm, raw):
            return prompt
        messages = [{"role": "user", "content": prompt}]
    if system and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    try:
        return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise GenkitError(f"the model's chat template failed on these messages ({e}); try --raw") from None


def encode(lm, texts: list[str], *, templated: bool, max_new_tokens: int):
    """Left-padded input ids and attention mask (on the model's device) for a batch of texts.

    Templated text already holds the special tokens the model expects, so none are added.
    """
    tok = lm.tokenizer
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    if min(lengths) == 0:
        raise GenkitError("the prompt is empty: pass some text")
    ctx = lm.context_length
    if ctx and not lm.is_encoder_decoder:
        longest = max(lengths)
        if longest >= ctx:
            raise GenkitError(
                f"the prompt is {longest} tokens but the model's context holds {ctx}: shorten the prompt"
            )
    return enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device), lengths


def pad(lm, rows: list[list[int]]):
    """Tokenised prompts as a padded (input ids, attention mask) on the model's device, padded
    with the pad token on the side the tokenizer pads (the left for decoder-only models): what
    `encode` gives for their texts. (tokenizer.pad would warn that a fast tokenizer tokenises
    faster than it pads.)"""
    import torch

    tok, width = lm.tokenizer, max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = slice(width - len(row), width) if tok.padding_side == "left" else slice(0, len(row))
        ids[i, at] = torch.tensor(row, dtype=torch.long)
        mask[i, at] = 1
    return ids.to(lm.device), mask.to(lm.device)


def fit_max_new_tokens(lm, prompt_tokens: int, max_new_tokens: int) -> int:
    """Cap generation at the model's context; the finish reason 'length' reports it."""
    ctx = lm.context_length
    if ctx and not lm.is_encoder_decoder:
        return max(1, min(max_new_tokens, ctx - prompt_tokens))
    return max_new_tokens

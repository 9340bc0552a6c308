"""Log-probabilities as records: genkit's shape and OpenAI's `logprobs.content[]`.

The values are those of the processed distribution the strategy chose from (after the
penalties, a constraint, temperature and the other warpers, and the watermark), so a token
sampled at temperature 0.7 reports its probability at 0.7; alternatives the processing removed
are not listed. Each token carries its text and its exact bytes: a byte-level BPE token can hold
part of a UTF-8 character, whose text alone would lose it.
"""

from __future__ import annotations

from functools import lru_cache

MAX_TOP = 20


def _byte_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE vocabularies (GPT-2's
    scheme): printable Latin-1 bytes stand for themselves, the others for 256 + n."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_alphabet()


class TokenText:
    """Each token id's text and bytes for one tokenizer (memoised)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.lookup = lru_cache(maxsize=65536)(self._uncached)

    def _uncached(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tok.decode([token_id], skip_special_tokens=False)
        piece = self.tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(ch in _BYTES for ch in piece) and "\ufffd" in text:
            return text, [_BYTES[ch] for ch in piece]  # part of a character: the raw bytes
        return text, list(text.encode("utf-8"))


def token_records(texts: TokenText, ids, logprobs, alternatives=None) -> list[dict]:
    """genkit's record: per generated token its text, id, bytes, logprob and top alternatives."""
    out = []
    for k, (token_id, lp) in enumerate(zip(ids, logprobs)):
        text, raw = texts.lookup(token_id)
        rec = {"token": text, "id": token_id, "bytes": raw, "logprob": round(lp, 6)}
        if alternatives is not None:
            rec["top_logprobs"] = [
                {"token": texts.lookup(i)[0], "id": i, "bytes": texts.lookup(i)[1], "logprob": round(v, 6)}
                for i, v in (alternatives[k] if k < len(alternatives) else [])
            ]
        out.append(rec)
    return out


def openai_content(records: list[dict]) -> dict:
    """OpenAI's `choices[].logprobs` object from genkit's token records."""
    def entry(r):
        return {"token": r["token"], "logprob": r["logprob"], "bytes": r["bytes"]}

    return {"content": [
        {**entry(r), "top_logprobs": [entry(a) for a in r.get("top_logprobs", [])]} for r in records
    ]}


def openai_legacy(records: list[dict], offset: int = 0) -> dict:
    """The completions API's `logprobs` object from genkit's token records: `text_offset` is
    each token's position in the choice's text (`offset` where the tokens of an earlier chunk
    of a stream ended), counted in the tokens' texts."""
    offsets = []
    for r in records:
        offsets.append(offset)
        offset += len(r["token"])
    return {
        "tokens": [r["token"] for r in records],
        "token_logprobs": [r["logprob"] for r in records],
        "top_logprobs": [{a["token"]: a["logprob"] for a in r.get("top_logprobs", [])} for r in records],
        "text_offset": offsets,
    }


def from_openai(body: dict) -> int | None:
    """The `logprobs` setting for an OpenAI request body: None (off), or the number of alternatives."""
    if not body.get("logprobs"):
        if body.get("top_logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return None
    top = body.get("top_logprobs") or 0
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP:
        raise ValueError(f"top_logprobs {top!r}: expected an integer from 0 to {MAX_TOP}")
    return top


def check_count(n: int | None, where: str) -> int | None:
    from genkit.errors import GenkitError

    if n is not None and not 0 <= n <= MAX_TOP:
        raise GenkitError(f"{where} {n}: expected 0 to {MAX_TOP} alternatives per token")
    return n

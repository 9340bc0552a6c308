"""Token ids to text as they arrive, ending exactly where `tokenizer.decode(ids)` ends.

Streaming decodes a short window instead of the whole sequence at every token: the text of
ids[prefix:read] was released already, so whatever the window ids[prefix:] adds beyond it is
new. Starting both decodes at the same token keeps tokenizer rules that depend on the first
token of a string (SentencePiece strips its leading space) out of the difference.

Text is held back while it could still change:
- it ends in U+FFFD, the mark of an incomplete UTF-8 sequence (byte-level BPE decodes each
  token's bytes; the character completes with a later token);
- it ends in a run of byte-fallback tokens (`<0xNN>`, SentencePiece-style tokenizers). The
  tokenizer decodes a whole run at once: valid UTF-8 gives its characters, anything else one
  U+FFFD per byte, even for the characters that were complete. A valid "é" followed by the
  first byte of another character therefore decodes as three U+FFFD once the sequence ends
  there, so no part of an open run is shown until a token that is not a byte closes it.
  Special tokens that decoding skips would join two runs, so they do not close one.

At the end the whole sequence is decoded once and what was not yet released follows, so the
final text is `tokenizer.decode(ids, skip_special_tokens=True)`, character for character.
"""

from __future__ import annotations

import logging
import weakref

log = logging.getLogger("genkit")

REPLACEMENT = "\ufffd"
_byte_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's `<0x00>`...`<0xFF>` tokens (empty for byte-level BPE)."""
    try:
        return _byte_ids[tokenizer]
    except (KeyError, TypeError):
        pass
    names = [f"<0x{b:02X}>" for b in range(256)]
    found = frozenset(
        i for name, i in zip(names, tokenizer.convert_tokens_to_ids(names))
        if i is not None and tokenizer.convert_ids_to_tokens(i) == name
    )
    try:
        _byte_ids[tokenizer] = found
    except TypeError:  # a tokenizer that cannot be weakly referenced: computed each time
        pass
    return found


class IncrementalDecoder:
    """The text of a growing list of ids (`ids` is read, never changed)."""

    def __init__(self, tokenizer, ids: list[int], skip_special: bool = True):
        self.tok = tokenizer
        self.ids = ids
        self.skip_special = skip_special
        self.released = ""  # everything returned so far
        self.diverged = False  # the final decode did not continue the released text
        self._open = byte_fallback_ids(tokenizer)
        if skip_special and self._open:
            self._open = self._open | frozenset(tokenizer.all_special_ids)
        self._prefix = 0
        self._read = 0

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special)

    def _settled_end(self) -> int:
        """How many ids are past any open run of byte-fallback tokens."""
        end = len(self.ids)
        while end > self._read and self.ids[end - 1] in self._open:
            end -= 1
        return end

    def step(self, final: bool = False) -> str:
        """The text that the ids added since the last call release (everything left if final)."""
        if final:
            return self._finish()
        end = self._settled_end()
        if end <= self._read:
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:end])
        if len(after) <= len(before) or after.endswith(REPLACEMENT) or not after.startswith(before):
            # Not settled yet (or a tokenizer rule rewrote earlier text: wait for the end).
            return ""
        self._prefix, self._read = self._read, end
        return self._emit(after[len(before):])

    def _finish(self) -> str:
        full = self._decode(self.ids)
        self._prefix = self._read = len(self.ids)
        if full.startswith(self.released):
            return self._emit(full[len(self.released):])
        # Released text cannot be taken back; the final text is still the exact decoding.
        log.debug("streamed text %r is not a prefix of the decoded sequence %r", self.released, full)
        self.diverged = True
        self.released = full
        return ""

    def _emit(self, text: str) -> str:
        self.released += text
        return text

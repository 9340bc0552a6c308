"""The text genkit shows is the tokenizer's decoding of its ids, on a byte-fallback tokenizer.

SentencePiece-style tokenizers (Llama 2, Gemma) spell what their vocabulary lacks as byte
tokens `<0xNN>`, and decode a run of them at once: its characters when the run is valid UTF-8,
otherwise one U+FFFD per byte. The tokenizer here is built in code with the `tokenizers`
library (Llama's decoder chain), small enough that a random model speaks mostly in bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genkit.engine.detokenize import byte_fallback_ids
from genkit.engine.tracker import SequenceState, Tracker

UNK, BOS, EOS = 0, 1, 2
FIRST_BYTE = 3
PIECES = ["▁", "a", "b", "c", "▁the", "▁cat", ".", "é", "你", "\ufffd"]
ORDINARY = list(range(FIRST_BYTE + 256, FIRST_BYTE + 256 + len(PIECES)))


def byte(b: int) -> int:
    return FIRST_BYTE + b


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS}
    vocab.update({f"<0x{b:02X}>": byte(b) for b in range(256)})
    vocab.update({piece: i for i, piece in zip(ORDINARY, PIECES)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


TOK = build_tokenizer()


def decoded(ids: list[int]) -> str:
    return TOK.decode(ids, skip_special_tokens=True)


def test_the_tokenizer_decodes_a_byte_run_as_a_whole():
    """What the engine has to follow (so a change in `tokenizers` shows here first)."""
    assert byte_fallback_ids(TOK) == frozenset(byte(b) for b in range(256))
    assert decoded([byte(0xC3), byte(0xA9)]) == "é"
    assert decoded([byte(0xC3), byte(0xA9), byte(0xE2)]) == "\ufffd" * 3
    assert decoded([byte(0xC3), BOS, byte(0xA9)]) == "é"  # a skipped special token joins runs


def stream(ids: list[int], chunks: list[int], stop: str | None = None, end_by_finish: bool = False):
    """Feed `ids` in chunks of the given sizes; the SequenceState and every delta shown."""
    seq = SequenceState(TOK, eos_ids=[EOS], max_new_tokens=len(ids) + (1 if end_by_finish else 0),
                        stop_strings=[stop] if stop else None)
    deltas, pos, sizes = [], 0, iter(chunks)
    while pos < len(ids) and not seq.done:
        n = next(sizes, 1)
        ev = seq.add(ids[pos:pos + n])
        pos += n
        deltas.append(ev.text)
        if not seq.done and stop is None:
            check_nothing_held_without_reason(seq.ids, "".join(deltas))
    if not seq.done:
        deltas.append(seq.finish("length").text)
    return seq, deltas


def check_nothing_held_without_reason(ids: list[int], shown: str):
    """Text is held back only behind an open run of bytes or a final U+FFFD."""
    last = ids[-1]
    settled = last in ORDINARY and not decoded(ids).endswith("\ufffd")
    if settled:
        assert shown == decoded(ids)


def character_bytes():
    chars = st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF, exclude_categories=("Cs",))
    whole = chars.map(lambda c: [byte(b) for b in c.encode()])
    cut = st.tuples(chars, st.integers(1, 3)).map(
        lambda t: [byte(b) for b in t[0].encode()[: min(t[1], len(t[0].encode()) - 1)]])
    return st.one_of(whole, cut.filter(bool))


PIECE = st.one_of(
    character_bytes(),  # a whole character in bytes, or the start of one
    st.integers(0, 255).map(lambda b: [byte(b)]),  # any byte, valid there or not
    st.sampled_from(ORDINARY).map(lambda i: [i]),
    st.just([BOS]),  # a special token that decoding skips
)
IDS = st.lists(PIECE, min_size=1, max_size=16).map(lambda pieces: [t for p in pieces for t in p])


@settings(max_examples=300, deadline=None)
@given(ids=IDS, chunks=st.lists(st.integers(1, 4), max_size=40), end_by_finish=st.booleans())
def test_streamed_text_is_the_decoding_of_the_ids(ids, chunks, end_by_finish):
    seq, deltas = stream(ids, chunks, end_by_finish=end_by_finish)
    assert "".join(deltas) == seq.text == decoded(ids)


@settings(max_examples=200, deadline=None)
@given(ids=IDS, chunks=st.lists(st.integers(1, 4), max_size=40), stop=st.sampled_from(["é", "\ufffd", "a", "t"]))
def test_with_a_stop_string_the_text_is_the_decoding_cut_before_it(ids, chunks, stop):
    seq, deltas = stream(ids, chunks, stop=stop)
    full = decoded(seq.ids)
    assert "".join(deltas) == seq.text == (full[: full.find(stop)] if stop in full else full)
    assert (seq.finish_reason == "stop") == (stop in full)


def test_an_incomplete_character_is_held_until_it_completes_or_the_sequence_ends():
    seq = SequenceState(TOK, eos_ids=[EOS], max_new_tokens=100, stop_strings=None)
    assert seq.add([ORDINARY[1]]).text == "a"
    assert seq.add([byte(0xE2), byte(0x82)]).text == ""
    assert seq.add([byte(0xAC)]).text == ""  # "€" is complete, but the run of bytes is still open
    assert seq.add([ORDINARY[2]]).text == "€b"

    tracker = Tracker(TOK, 1, eos_ids=[EOS], max_new_tokens=100)
    shown = [e.text for e in tracker.add([[byte(0xC3), byte(0xA9), byte(0xE2)]])]
    shown += [e.text for e in tracker.finish_all("time")]
    assert "".join(shown) == tracker.seqs[0].text == "\ufffd" * 3 == decoded(tracker.seqs[0].ids)


# ---------------------------------------------------------------- every strategy, on a model


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random Llama over the byte-fallback vocabulary: it talks mostly in bytes."""
    import torch
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM

    from genkit import models

    path = tmp_path_factory.mktemp("byte-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=len(TOK), max_position_embeddings=128))
    model.generation_config.pad_token_id = EOS
    model.save_pretrained(path)
    TOK.save_pretrained(path)
    return models.load(str(path))


STRATEGIES = {
    "greedy": {},
    "sampling": {"do_sample": True, "seed": 1, "num_return_sequences": 2},
    "beam": {"num_beams": 3, "num_return_sequences": 2},
    "beam-sampling": {"num_beams": 3, "do_sample": True, "seed": 1},
    "diverse-beam": {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0, "num_return_sequences": 2},
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
    "dola": {"dola_layers": "high", "repetition_penalty": 1.2},
    "prompt-lookup": {"prompt_lookup_num_tokens": 3},
    "assisted": {"assistant_model": "itself", "num_assistant_tokens": 3},
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_shows_the_decoding_of_its_ids(byte_model, name):
    import genkit

    params = dict(STRATEGIES[name])
    assistant = byte_model if "assistant_model" in params else None
    gen = genkit.stream(byte_model, ["héllo wörld 🌊", "the cat ☕"], raw=True, max_new_tokens=24,
                        assistant=assistant, **params)
    shown: dict[int, str] = {}
    for ev in gen:
        shown[ev.index] = shown.get(ev.index, "") + ev.text
    for r in gen.results:
        assert r.text == decoded(r.token_ids) == shown.get(r.index, "")
    ids = [t for r in gen.results for t in r.token_ids]
    assert sum(t in byte_fallback_ids(TOK) for t in ids) > len(ids) // 2  # the edge is reached

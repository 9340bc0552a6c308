"""The tracker: incremental text across multi-byte characters, stop strings, stopping rules."""

import io

import pytest

from genkit.engine.tracker import SequenceState, Tracker


@pytest.fixture(scope="module")
def tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


TEXTS = ["Grüße aus Köln! 你好，世界。🌊🐚 naïve café", "日本語のテキスト、絵文字👍🏽も。"]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_rebuild_the_text_one_token_at_a_time(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = SequenceState(tok, eos_ids=[2], max_new_tokens=1000, stop_strings=None)
    deltas = [seq.add([t]).text for t in ids]
    assert all("\ufffd" not in d for d in deltas)  # no half characters ever shown
    assert "".join(deltas) == tok.decode(ids) == text


def test_eos_and_length(tok):
    seq = SequenceState(tok, eos_ids=[2], max_new_tokens=100, stop_strings=None)
    ev = seq.add([28, 2, 28])
    assert ev.token_ids == [28, 2] and ev.finish_reason == "eos"
    seq = SequenceState(tok, eos_ids=[2], max_new_tokens=3, stop_strings=None)
    assert seq.add([28, 29]).finish_reason is None
    ev = seq.add([30, 31])
    assert ev.token_ids == [30] and ev.finish_reason == "length" and seq.ids == [28, 29, 30]


def test_stop_string_cut_and_held_back(tok):
    text = "alpha beta END gamma"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = SequenceState(tok, eos_ids=[2], max_new_tokens=100, stop_strings=["END"])
    shown = ""
    for t in ids:
        ev = seq.add([t])
        if ev is None:
            break
        shown += ev.text
        assert "E" not in shown  # a possible start of the stop string is never shown early
        if ev.finish_reason:
            break
    assert seq.finish_reason == "stop"
    assert shown == seq.text == "alpha beta "


def test_held_back_text_is_flushed_when_not_a_stop(tok):
    ids = tok("the EN", add_special_tokens=False)["input_ids"]
    tr = Tracker(tok, 1, eos_ids=[2], max_new_tokens=len(ids), stop_strings=["END"])
    events = [ev for t in ids for ev in tr.add([[t]])]
    assert tr.all_done and tr.seqs[0].finish_reason == "length"
    assert "".join(e.text for e in events) == "the EN"


def test_text_streamer_plugs_in(embedded, capsys):
    """transformers' TextStreamer (put()/end()) prints exactly genkit's text."""
    from transformers import TextStreamer

    import genkit

    streamer = TextStreamer(embedded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = genkit.generate(embedded, "What is the capital of France?", preset="greedy",
                             max_new_tokens=20, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed.strip() == result.text.strip() and "Paris" in printed

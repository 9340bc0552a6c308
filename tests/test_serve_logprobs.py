"""Log-probabilities from `genkit serve` in OpenAI's shapes, checked against `genkit.generate`
with the same settings: the same tokens (text and bytes) and the same values, within 1e-4."""

from __future__ import annotations

import threading

import openai
import pytest

from genkit.logprobs import TokenText, token_records
from serving import CHAT, NO_EOS, expected, lm, long_dir, one_thread, server  # noqa: F401

PROMPT = "The quick brown fox"


def want_records(lm, prompt, top, **kw):
    """genkit's token records of each sequence `genkit.generate` gives (as `run --json --logprobs`)."""
    result = expected(lm, prompt, logprobs=top, **kw)
    texts = TokenText(lm.tokenizer)
    return [token_records(texts, r.token_ids, r.logprobs, r.alternatives) for r in result.results]


def same_records(got: list[dict], want: list[dict]) -> None:
    """OpenAI's content entries against genkit's records: tokens exact, values within 1e-4."""
    assert [(g["token"], g["bytes"]) for g in got] == [(w["token"], w["bytes"]) for w in want]
    assert [g["logprob"] for g in got] == pytest.approx([w["logprob"] for w in want], abs=1e-4)
    for g, w in zip(got, want):
        assert [a["bytes"] for a in g["top_logprobs"]] == [a["bytes"] for a in w["top_logprobs"]]
        assert [a["logprob"] for a in g["top_logprobs"]] == pytest.approx(
            [a["logprob"] for a in w["top_logprobs"]], abs=1e-4)


def content(choice) -> list[dict]:
    return [c.model_dump() for c in choice.logprobs.content]


def test_chat_logprobs_greedy_and_sampled_at_once(server, lm):
    """A greedy request with a penalty and a sampled one with n=2 share the batch; each reports
    the processed distribution its own tokens were chosen from."""
    client = server.client()
    name = client.models.list().data[0].id
    asks = {
        "greedy": dict(max_tokens=8, logprobs=True, top_logprobs=3,
                       extra_body={**NO_EOS, "repetition_penalty": 1.3}),
        "sampled": dict(max_tokens=8, logprobs=True, top_logprobs=2, n=2, seed=5, temperature=0.7,
                        extra_body={**NO_EOS, "top_k": 4}),
        "plain": dict(max_tokens=8, extra_body=NO_EOS),
    }
    got: dict = {}
    threads = [threading.Thread(target=lambda k=k: got.update(
        {k: client.chat.completions.create(model=name, messages=CHAT, **asks[k])})) for k in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    want = want_records(lm, CHAT, 3, max_new_tokens=8, suppress_tokens=[2], repetition_penalty=1.3)
    same_records(content(got["greedy"].choices[0]), want[0])
    want = want_records(lm, CHAT, 2, max_new_tokens=8, suppress_tokens=[2], num_return_sequences=2, seed=5,
                        do_sample=True, temperature=0.7, top_k=4)
    for choice, w in zip(got["sampled"].choices, want):
        same_records(content(choice), w)
        assert all(len(c["top_logprobs"]) == 2 for c in content(choice))
    assert got["plain"].choices[0].logprobs is None


def test_chat_stream_logprobs_match_the_answer(server, lm):
    client = server.client()
    name = client.models.list().data[0].id
    chunks = list(client.chat.completions.create(model=name, messages=CHAT, max_tokens=10, logprobs=True,
                                                 top_logprobs=1, stream=True, extra_body=NO_EOS))
    streamed = [c.model_dump() for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]
    want = want_records(lm, CHAT, 1, max_new_tokens=10, suppress_tokens=[2])
    same_records(streamed, want[0])
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_legacy_logprobs(server, lm):
    client = server.client()
    name = client.models.list().data[0].id
    resp = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, logprobs=2, extra_body=NO_EOS)
    lp = resp.choices[0].logprobs
    want = want_records(lm, PROMPT, 2, raw=True, max_new_tokens=6, suppress_tokens=[2])[0]
    assert lp.tokens == [w["token"] for w in want]
    assert lp.token_logprobs == pytest.approx([w["logprob"] for w in want], abs=1e-4)
    for got_top, w in zip(lp.top_logprobs, want):
        assert list(got_top) == [a["token"] for a in w["top_logprobs"]]
        assert list(got_top.values()) == pytest.approx([a["logprob"] for a in w["top_logprobs"]], abs=1e-4)
    assert lp.text_offset == [sum(len(w["token"]) for w in want[:k]) for k in range(len(want))]
    stream = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=6, logprobs=2, stream=True,
                                            extra_body=NO_EOS))
    parts = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    assert [x for p in parts for x in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_logprobs_of_a_strategy_outside_the_batch(server, lm):
    """Beam search runs alone through Generation: the server reports what `genkit.generate` does."""
    client = server.client()
    name = client.models.list().data[0].id
    resp = client.completions.create(model=name, prompt=PROMPT, max_tokens=5, logprobs=0,
                                     extra_body={**NO_EOS, "num_beams": 2})
    want = expected(lm, PROMPT, raw=True, max_new_tokens=5, suppress_tokens=[2], num_beams=2, logprobs=0)
    texts = TokenText(lm.tokenizer)
    assert resp.choices[0].logprobs.tokens == [texts.lookup(i)[0] for i in want.results[0].token_ids]
    assert resp.choices[0].logprobs.token_logprobs == pytest.approx(want.results[0].logprobs, abs=1e-4)


def test_bad_logprobs_requests_are_400(server):
    client = server.client()
    name = client.models.list().data[0].id
    for kw, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                      ({"top_logprobs": 2}, "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=name, messages=CHAT, **kw)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="x", logprobs=21)
    assert e.value.body["param"] == "logprobs" and "0 to 20" in e.value.body["message"]

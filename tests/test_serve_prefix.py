"""Recent prompts' KV cache (genkit/engine/prefixes.py): a prompt that begins like a kept one
prefills only the rest, and every answer is still, token for token, the one a full prefill gives."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from genkit.engine.prefixes import PrefixCache
from serving import NO_EOS, expected, lm, long_dir, one_thread, server  # noqa: F401

SYSTEM = ("You are the harbour master's assistant. Answer in full sentences, name the tides and the "
          "weather when they matter, and never guess a ferry time you were not given. ") * 6


def prompt_ids(lm, messages) -> list[int]:
    """The ids the server prefills for chat messages (as genkit.generate tokenizes them)."""
    from genkit import prompts

    text = prompts.to_text(lm, messages, system=None, raw=False)
    return lm.tokenizer(text, add_special_tokens=not prompts.uses_chat(lm, False))["input_ids"]


def shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return min(n, len(b) - 1)


def chat(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def prefilled(server) -> int:
    return httpx.get(server.root + "/health").json()["prefilled_tokens"]


def test_a_shared_system_prompt_is_prefilled_once(server, lm):
    client = server.client()
    name = client.models.list().data[0].id
    system = "First test. " + SYSTEM
    first, second = chat(system, "When is high tide?"), chat(system, "Is the ferry running today, and when?")
    before = prefilled(server)
    r1 = client.chat.completions.create(model=name, messages=first, max_tokens=8, extra_body=NO_EOS)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert prefilled(server) - before == r1.usage.prompt_tokens
    r2 = client.chat.completions.create(model=name, messages=second, max_tokens=8, extra_body=NO_EOS)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached == shared(prompt_ids(lm, first), prompt_ids(lm, second)) > 100
    assert prefilled(server) - before == r1.usage.prompt_tokens + r2.usage.prompt_tokens - cached
    for messages, resp in ((first, r1), (second, r2)):
        assert resp.choices[0].message.content == expected(lm, messages, max_new_tokens=8, suppress_tokens=[2]).text
    cache = httpx.get(server.root + "/health").json()["prefix_cache"]
    assert cache["hits"] >= 1 and 0 < cache["bytes"] <= cache["max_bytes"]


def test_concurrent_requests_reusing_a_prefix_answer_as_with_a_full_prefill(server, lm):
    """Greedy, sampled and n=2 requests with the same system prompt and questions of different
    lengths (so rows of one prefill reuse different numbers of positions), and one that shares
    nothing, all at once: each answer is genkit.generate's."""
    client = server.client()
    name = client.models.list().data[0].id
    system = "Second test. " + SYSTEM
    client.chat.completions.create(model=name, messages=chat(system, "Warm up."), max_tokens=2)
    questions = ["Tide?", "What time does the evening ferry leave, and from which pier?",
                 "Weather for the fishing boats tomorrow morning, please, with the wind.", "Hello.",
                 "Which pier?", "Name three boats."]
    asks = [dict(max_tokens=6 + i, extra_body=NO_EOS, **(dict(temperature=0.8, seed=i) if i % 2 else {}),
                 **(dict(n=2) if i == 3 else {})) for i in range(len(questions))]
    messages = [chat(system, q) for q in questions] + [[{"role": "user", "content": "Unrelated and short."}]]
    asks.append(dict(max_tokens=5, extra_body=NO_EOS))
    got: dict = {}

    def ask(i):
        got[i] = client.chat.completions.create(model=name, messages=messages[i], **asks[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(messages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, ask_ in enumerate(asks):
        kw = dict(max_new_tokens=ask_["max_tokens"], suppress_tokens=[2])
        if "seed" in ask_:
            kw.update(do_sample=True, temperature=0.8, seed=ask_["seed"])
        if "n" in ask_:
            kw.update(num_return_sequences=2, do_sample=True)
        want = expected(lm, messages[i], **kw)
        assert [c.message.content for c in got[i].choices] == want.texts, i
    assert sum(got[i].usage.prompt_tokens_details.cached_tokens for i in range(len(questions))) > 100
    assert got[len(questions)].usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("fast", [True, False], ids=["genkit-decoder", "transformers-forward"])
def test_batcher_reuses_prefixes_with_the_tokens_of_a_full_prefill(lm, fast):
    """In process, on genkit's decoder and on transformers' forward: jobs whose prompts share
    beginnings of different lengths give the same tokens with the prefix cache as without it."""
    from genkit.engine.continuous import ContinuousBatcher, Job
    from genkit.engine.settings import build

    if fast and lm.backend.fast is None:
        pytest.skip("genkit's decoder needs its CPU kernels")
    s = build(lm, {"max_new_tokens": 6, "suppress_tokens": [2]})
    base = lm.tokenizer("A long shared beginning about harbours, ferries and tides. " * 4)["input_ids"]
    prompts = [base + lm.tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in ("one", "two more words", "a question of a good many more words than the others", "x")]
    prompts += [base[:30], lm.tokenizer("nothing in common")["input_ids"]]

    def run(keep: bool):
        b = ContinuousBatcher(lm, s, batch_size=8)
        b.fast = b.fast if fast else None  # None: transformers' forward over the same cache
        b.prefixes = PrefixCache(64 * 2**20) if keep else None
        first = [r.sequences[0].token_ids for r in b.run([Job(0, prompts[0], 0, 6)])]
        jobs = [Job(i, p, 0, 6) for i, p in enumerate(prompts[1:], 1)]
        rest = {r.handle: r.sequences[0].token_ids for r in b.run(jobs)}
        return first + [rest[i] for i in range(1, len(prompts))], b.prefilled_tokens

    plain, fed_plain = run(False)
    reused, fed_reused = run(True)
    assert reused == plain
    assert fed_plain == sum(map(len, prompts))
    assert fed_reused < fed_plain / 2  # most of four prompts came from the cache


def test_prefix_cache_is_bounded_and_least_recently_used_goes_first():
    def kv(n):  # one layer, one head, 4 dims: 32 bytes a position for keys and values
        return [torch.zeros(1, n, 4)], [torch.zeros(1, n, 4)]

    cache = PrefixCache(max_bytes=32 * 100, min_reuse=4)
    a, b, c = list(range(40)), list(range(100, 140)), list(range(200, 240))
    cache.store(a, *kv(40))
    cache.store(b, *kv(40))
    assert cache.lookup(a + [7, 8])[1] == 40  # a is now the most recently used
    cache.store(c, *kv(40))  # over 100 positions: b, the least recently used, goes
    assert cache.lookup(b + [1]) is None and cache.lookup(c + [1])[1] == 40
    assert cache.bytes == 32 * 80
    cache.store(a + [1, 2, 3], *kv(43))  # extends a: replaces it
    assert cache.stats()["entries"] == 2 and cache.stats()["tokens"] == 83
    cache.store(a[:20], *kv(20))  # a kept entry already begins so: not stored twice
    assert cache.stats()["entries"] == 2
    assert cache.lookup(a[:3] + [99] * 10) is None  # fewer than min_reuse shared
    assert cache.lookup(a[:10]) == (cache.lookup(a)[0], 9)  # never the prompt's last token

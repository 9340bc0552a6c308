"""`genkit serve` with the official `openai` client against a real server on 127.0.0.1.

The server runs as a subprocess on a free port (it prints the address it bound); the same
tiny random model is loaded here, and every answer is compared with `genkit.generate` on the
same settings: the server must not change a token.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest

from serving import CHAT, KEY, NO_EOS, Server, expected, lm, long_dir, one_thread, server  # noqa: F401

# ---------------------------------------------------------------------- answers


def test_chat_matches_generate(server, lm):
    name = server.client().models.list().data[0].id
    resp = server.client().chat.completions.create(model=name, messages=CHAT, max_tokens=12, extra_body=NO_EOS)
    want = expected(lm, CHAT, max_new_tokens=12, suppress_tokens=[2])
    assert resp.choices[0].message.content == want.text
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == want.stats.prompt_tokens
    assert resp.usage.completion_tokens == 12
    assert resp.object == "chat.completion" and resp.model == name


def test_stream_has_the_same_text_and_a_usage_chunk(server, lm):
    name = server.client().models.list().data[0].id
    chunks = list(server.client().chat.completions.create(
        model=name, messages=CHAT, max_tokens=12, stream=True, extra_body=NO_EOS))
    want = expected(lm, CHAT, max_new_tokens=12, suppress_tokens=[2])
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == want.stats.prompt_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completions_are_raw_text(server, lm):
    name = server.client().models.list().data[0].id
    resp = server.client().completions.create(model=name, prompt="The quick brown fox", max_tokens=10,
                                              extra_body=NO_EOS)
    want = expected(lm, "The quick brown fox", raw=True, max_new_tokens=10, suppress_tokens=[2])
    assert resp.choices[0].text == want.text
    assert resp.usage.prompt_tokens == want.stats.prompt_tokens


def test_n_and_seed_reproduce_generate(server, lm):
    client = server.client()
    name = client.models.list().data[0].id
    ask = dict(model=name, messages=CHAT, max_tokens=10, n=3, seed=11, temperature=0.8, extra_body=NO_EOS)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    want = expected(lm, CHAT, max_new_tokens=10, num_return_sequences=3, seed=11, do_sample=True,
                    temperature=0.8, suppress_tokens=[2])
    assert texts == want.texts
    assert [c.message.content for c in again.choices] == texts
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # three samples, not one repeated


def test_concurrent_requests_each_get_their_own_answer(server, lm):
    """Eight requests at once, greedy and sampled, some with penalties, share the batch; each
    answer is the one `genkit.generate` gives it alone."""
    client = server.client()
    name = client.models.list().data[0].id
    prompts = [f"Count to {i}." for i in range(8)]
    answers: dict[int, str] = {}

    def extra(i):  # a third of them with penalties of their own, scored on their own rows
        return {**NO_EOS, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2} if i % 3 == 0 else NO_EOS

    def ask(i):
        kw = dict(temperature=0.7, seed=i) if i % 2 else {}
        r = client.completions.create(model=name, prompt=prompts[i], max_tokens=6 + i, extra_body=extra(i), **kw)
        answers[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(8):
        kw = dict(do_sample=True, temperature=0.7, seed=i) if i % 2 else {}
        params = {k: v for k, v in extra(i).items()}
        want = expected(lm, prompts[i], raw=True, max_new_tokens=6 + i, **params, **kw)
        assert answers[i] == want.text, i


def test_genkit_parameters_through_extra_fields(server, lm):
    """Beam search (outside the shared batch) and stop strings, by extra fields and OpenAI's stop."""
    name = server.client().models.list().data[0].id
    resp = server.client().completions.create(
        model=name, prompt="Once upon a time", max_tokens=8, extra_body={"num_beams": 3, **NO_EOS})
    want = expected(lm, "Once upon a time", raw=True, max_new_tokens=8, num_beams=3, suppress_tokens=[2])
    assert resp.choices[0].text == want.text
    full = expected(lm, "Once upon a time", raw=True, max_new_tokens=8, suppress_tokens=[2]).text
    stop = full.split()[1]
    resp = server.client().completions.create(model=name, prompt="Once upon a time", max_tokens=8, stop=[stop],
                                              extra_body=NO_EOS)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == full[:full.index(stop)]


def test_models_list_the_presets(server):
    ids = [m.id for m in server.client().models.list().data]
    name = ids[0]
    assert f"{name}:creative" in ids and f"{name}:greedy" in ids
    assert server.client().models.retrieve(f"{name}:greedy").id == f"{name}:greedy"
    health = httpx.get(server.root + "/health").json()
    assert health["status"] == "ok" and health["model"] == name


def test_a_preset_by_model_name(server, lm):
    name = server.client().models.list().data[0].id
    resp = server.client().completions.create(model=f"{name}:creative", prompt="Hello", max_tokens=6, seed=4,
                                              extra_body=NO_EOS)
    want = expected(lm, "Hello", raw=True, preset="creative", max_new_tokens=6, seed=4, suppress_tokens=[2])
    assert resp.choices[0].text == want.text


# ---------------------------------------------------------------------- errors


def test_errors_in_openai_shape(server):
    client = server.client()
    name = client.models.list().data[0].id
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=CHAT, extra_body={"num_beam": 2})
    assert e.value.body["param"] == "num_beam" and "did you mean 'num_beams'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=CHAT, frequency_penalty=0.5)
    assert e.value.body["param"] == "frequency_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=CHAT, n=2, temperature=0)
    assert "num_return_sequences" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="word " * 5000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


COLOUR = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["colour", "count"], "additionalProperties": False}


def test_response_format_constrains_rows_in_the_shared_batch(server, lm):
    """A JSON schema (sampled), a JSON object (greedy) and a plain request at once: each is the
    text genkit.generate gives with the same constraint, and constrained ones parse."""
    import jsonschema

    client = server.client()
    name = client.models.list().data[0].id
    schema_format = {"type": "json_schema", "json_schema": {"name": "colour", "schema": COLOUR, "strict": True}}
    asks = {
        "schema": dict(response_format=schema_format, temperature=0.9, seed=3, n=2, max_tokens=60),
        "object": dict(response_format={"type": "json_object"}, max_tokens=30),
        "plain": dict(max_tokens=12, extra_body=NO_EOS),
    }
    got: dict = {}

    def ask(key):
        got[key] = client.chat.completions.create(model=name, messages=CHAT, **asks[key])

    threads = [threading.Thread(target=ask, args=(k,)) for k in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    want = expected(lm, CHAT, json_schema=COLOUR, do_sample=True, temperature=0.9, seed=3,
                    num_return_sequences=2, max_new_tokens=60)
    texts = [c.message.content for c in got["schema"].choices]
    assert texts == want.texts
    for c in got["schema"].choices:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), COLOUR)
    assert any(c.finish_reason == "stop" for c in got["schema"].choices)
    want = expected(lm, CHAT, json_object=True, max_new_tokens=30)
    assert got["object"].choices[0].message.content == want.text
    assert got["plain"].choices[0].message.content == expected(lm, CHAT, max_new_tokens=12, suppress_tokens=[2]).text


def test_a_bad_response_format_is_400(server):
    client = server.client()
    name = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=CHAT, response_format={"type": "yaml"})
    assert e.value.body["param"] == "response_format" and "yaml" in e.value.body["message"]


def test_malformed_json_and_wrong_types_are_400(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/chat/completions", headers=auth,
                   json={"model": "x", "messages": CHAT, "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(server.url + "/nowhere", headers=auth, json={})
    assert r.status_code == 404 and "error" in r.json()


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-wrong").models.list()
    r = httpx.get(server.url + "/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.root + "/health").status_code == 200


# ---------------------------------------------------------------------- the batch and its rows


def _health(server) -> dict:
    return httpx.get(server.root + "/health").json()


def test_a_client_that_disconnects_frees_its_row(server):
    name = server.client().models.list().data[0].id
    body = {"model": name, "prompt": "Go on", "max_tokens": 4000, "stream": True, **NO_EOS}
    with httpx.stream("POST", server.url + "/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert _health(server)["running_rows"] == 1
    deadline = time.monotonic() + 5
    while _health(server)["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _health(server)["running_rows"] == 0


def test_a_waiting_client_that_gives_up_frees_its_row(server):
    """Not streamed: the server notices the closed connection while it waits for the answer."""
    name = server.client().models.list().data[0].id
    body = {"model": name, "prompt": "Go on", "max_tokens": 4000, **NO_EOS}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.5)
    deadline = time.monotonic() + 5
    while _health(server)["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _health(server)["running_rows"] == 0


def test_overload_is_429_and_sigterm_finishes_running_requests(long_dir):
    srv = Server(long_dir, "--max-batch", "1", "--max-queue", "1", "--shutdown-timeout", "300")
    try:
        client = srv.client()
        name = client.models.list().data[0].id
        # Long enough to still be running while the other two arrive, on a slow machine too.
        stream = client.completions.create(model=name, prompt="Go on", max_tokens=2000, stream=True,
                                           extra_body=NO_EOS)
        first = next(iter(stream))
        assert first.choices[0].text is not None
        queued: dict = {}
        waiter = threading.Thread(target=lambda: queued.update(r=client.completions.create(
            model=name, prompt="Wait", max_tokens=5, extra_body=NO_EOS)))
        waiter.start()
        deadline = time.monotonic() + 10
        while _health(srv)["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=name, prompt="No room", max_tokens=5)
        assert e.value.status_code == 429 and e.value.body["code"] == "overloaded"
        srv.terminate()
        rest = list(stream)
        waiter.join(60)
    finally:
        code, err = srv.stop()
    texts = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert texts == ["length"]  # the running stream finished, all 2000 tokens
    assert rest[-1].usage.completion_tokens == 2000
    assert queued["r"].usage.completion_tokens == 5  # the waiting one ran too
    assert code == 0, err
    assert "Traceback" not in err


def test_a_taken_port_fails_before_the_model_loads(long_dir):
    import socket

    from conftest import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", "--model", str(long_dir), "--port", str(port), timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"genkit: error: cannot listen on 127.0.0.1:{port} (Address already in use): "
        "choose another --port or stop the program that holds it"]

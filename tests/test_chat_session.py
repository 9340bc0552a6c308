"""The chat session in the library: the KV cache kept between turns gives the tokens a generation
from scratch on the whole conversation gives, and the slash commands' decisions."""

import json

import pytest

from genkit.chat import ChatSession
from genkit.engine import Generation
from genkit.errors import GenkitError
from helpers import on_backend

MESSAGES = ["Hello there", "Tell me more about it, please.", "Why?", "And then what happened next"]


def answer(session, text):
    for _ in session.ask(text):
        pass
    return session.messages[-1]["content"]


def from_scratch(session):
    """The last answer's token ids generated again on the full conversation, no cache."""
    history = session.messages[:-1]
    gen = Generation(session.lm, [history], session.settings, system=session.system)
    return gen.run()[0].token_ids


@pytest.mark.parametrize("backend", ["auto", "transformers"], ids=["genkit-decoder", "transformers-forward"])
def test_kept_cache_equals_generation_from_scratch(tiny, backend):
    lm = on_backend(tiny, backend)
    assert lm.backend.kind == ("genkit" if backend == "auto" else "transformers")
    session = ChatSession(lm, overrides={"max_new_tokens": 9})
    for i, text in enumerate(MESSAGES):
        for _ in session.ask(text):
            pass
        assert session.last_result.token_ids == from_scratch(session), f"turn {i + 1}"
        if i == 0:
            assert session.last.reused_tokens == 0
        else:
            # everything before the newest message came from the cache
            assert session.last.reused_tokens > session.totals.history[i - 1].prompt_tokens // 2
    assert session.totals.turns == len(MESSAGES)
    assert session.totals.prefilled_tokens + session.totals.reused_tokens == sum(
        t.prompt_tokens for t in session.totals.history)


def test_sampled_turns_reproducible_with_seed(tiny):
    texts = []
    for _ in range(2):
        session = ChatSession(tiny, overrides={"max_new_tokens": 6, "do_sample": True, "seed": 5})
        texts.append([answer(session, m) for m in MESSAGES[:3]])
    assert texts[0] == texts[1]


def test_beam_turns_run_without_reuse(tiny):
    session = ChatSession(tiny, overrides={"max_new_tokens": 5, "num_beams": 2})
    answer(session, "Hi")
    answer(session, "Again")
    assert session.last.reused_tokens == 0 and session.cache.runner is None


def test_set_preset_system_undo_retry_clear(tiny):
    session = ChatSession(tiny, overrides={"max_new_tokens": 4})
    assert session.set_param("temperature", "0.5") == ("temperature", 0.5)
    with pytest.raises(GenkitError, match="top_p"):
        session.set_param("top_p", "7")
    assert "top_p" not in session.set_overrides  # a bad /set changes nothing
    with pytest.raises(GenkitError, match="did you mean 'temperature'"):
        session.set_param("temprature", "1")
    session.use_preset("creative")
    assert session.settings.do_sample and session.settings.temperature == 0.5  # /set stays on top
    with pytest.raises(GenkitError):
        session.use_preset("no-such-preset")
    assert session.resolved.name == "creative"
    session.use_preset("greedy")
    session.set_system("You are terse.")
    assert session.system == "You are terse."
    first = answer(session, "Hi")
    for _ in session.retry():
        pass
    assert session.messages[-1]["content"] == first  # greedy: the same answer again
    assert len(session.messages) == 2
    assert session.undo() == 2 and session.messages == []
    with pytest.raises(GenkitError, match="nothing to undo"):
        session.undo()
    with pytest.raises(GenkitError, match="nothing to retry"):
        session.retry()
    answer(session, "Hi")
    session.clear()
    assert session.messages == [] and session.cache.runner is None


def test_save_and_load(tiny, tmp_path):
    session = ChatSession(tiny, overrides={"max_new_tokens": 4})
    session.set_param("repetition_penalty", "1.3")
    answer(session, "Hi")
    path = session.save(str(tmp_path / "c.json"))
    data = json.loads(path.read_text())
    assert data["messages"] == session.messages and data["settings"] == {"repetition_penalty": 1.3}
    other = ChatSession(tiny, overrides={"max_new_tokens": 4})
    assert other.load(str(path)) == 2
    assert other.messages == session.messages and other.settings.repetition_penalty == 1.3
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GenkitError, match="not a saved chat"):
        other.load(str(tmp_path / "bad.json"))
    with pytest.raises(GenkitError, match="cannot read"):
        other.load(str(tmp_path / "missing.json"))
    (tmp_path / "wrong.json").write_text('{"messages": [{"role": "robot", "content": 1}]}')
    with pytest.raises(GenkitError, match="message 1"):
        other.load(str(tmp_path / "wrong.json"))
    assert other.messages == session.messages  # a failed /load keeps the conversation


@pytest.mark.slow
def test_kept_cache_on_the_embedded_model(embedded):
    """A real model's answers re-tokenise as they were generated, so each turn prefills only the
    new message's few tokens, and the tokens stay those of a generation from scratch."""
    session = ChatSession(embedded, overrides={"max_new_tokens": 12})
    for i, text in enumerate(["What is the capital of France?", "And of Italy?", "And of Spain?"]):
        for _ in session.ask(text):
            pass
        assert session.last_result.token_ids == from_scratch(session), f"turn {i + 1}"
        if i:
            assert session.last.prompt_tokens - session.last.reused_tokens < 20

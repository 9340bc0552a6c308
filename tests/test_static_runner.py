"""The static-cache runner (genkit/engine/static_runner.py): what a GPU's CUDA graphs replay.

On the CPU the runner runs its decode step without graphs, so these tests check the cache,
mask, position and reordering logic that the graph captures; the `cuda` test checks the graph
replay itself where a GPU is present.
"""

import pytest
import torch

from genkit.errors import GenkitError
from helpers import encode, genkit_generate, hf_generate, on_backend

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]


@pytest.fixture
def static(tiny):
    """The tiny model decoded by the static runner on this CPU (genkit's own decoder off)."""
    lm = on_backend(tiny, "static")
    assert lm.backend.kind == "static" and not lm.backend.graphs
    return lm


def _runners(lm, texts, capacity=None):
    from genkit.engine.runner import Runner
    from genkit.engine.static_runner import StaticRunner

    ids, mask = encode(lm, texts)
    return Runner(lm.model, ids, mask), StaticRunner(on_backend(lm, "static").backend, ids, mask, capacity)


def test_logits_follow_the_dynamic_cache_past_growth_drafts_and_crops(tiny):
    plain, static = _runners(tiny, PROMPTS)
    assert static.cache.capacity == 64  # prompt + 1, rounded: 150 steps make it grow twice
    with torch.inference_mode():
        a, b = plain.prefill().logits, static.prefill().logits
        assert torch.equal(a, b)
        for _ in range(150):
            token = a[:, -1].argmax(-1)[:, None]
            a, b = plain.step(token).logits, static.step(token).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert static.cache.capacity == 256 and static.length == plain.length
        draft = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]])
        torch.testing.assert_close(plain.step(draft).logits, static.step(draft).logits, rtol=0, atol=1e-5)
        plain.crop(plain.length - 3)
        static.crop(static.length - 3)
        token = draft[:, 2:3]
        torch.testing.assert_close(plain.step(token).logits, static.step(token).logits, rtol=0, atol=1e-5)
        assert static.length == plain.length


def test_same_size_reorder_keeps_the_buffers_graphs_read(tiny):
    _, static = _runners(tiny, PROMPTS)
    with torch.inference_mode():
        static.prefill()
        static.step(torch.tensor([[5], [6]]))
        keys, live = static.cache.keys.data_ptr(), static.cache.live.data_ptr()
        before = static.cache.keys.clone()
        static.select(torch.tensor([1, 1]))
        assert static.cache.keys.data_ptr() == keys and static.cache.live.data_ptr() == live
        assert torch.equal(static.cache.keys[:, 0], before[:, 1])
        static.repeat_interleave(2)  # a new batch size: a second set of tensors
        assert static.batch_size == 4 and static.cache.keys.shape[1] == 4
        expanded = static.cache.keys.data_ptr()
        static.select(torch.tensor([1, 2]))  # back to 2 rows (contrastive search's winners)
        assert static.cache.keys.data_ptr() == keys and static.cache.live.data_ptr() == live
        assert torch.equal(static.cache.keys[:, 0], before[:, 1]) and torch.equal(static.cache.keys[:, 1], before[:, 1])
        static.repeat_interleave(2)  # and out again: the spare set, same addresses
        assert static.cache.keys.data_ptr() == expanded


@pytest.mark.parametrize("params", [
    {},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
    {"num_beams": 3},
    {"prompt_lookup_num_tokens": 4},
])
def test_greedy_beam_and_lookup_match_transformers(tiny, static, params):
    texts = PROMPTS[:1] if "prompt_lookup_num_tokens" in params else PROMPTS  # generate(): batch 1 only
    ours = genkit_generate(static, texts, max_new_tokens=20, **params)
    theirs = hf_generate(tiny, texts, max_new_tokens=20, do_sample=False, **params)
    assert ours == theirs


def test_eager_attention_gets_an_additive_mask(tiny_dir):
    from genkit import models

    lm = models.load(str(tiny_dir), models.LoadOptions(backend="static"))
    lm.model.set_attn_implementation("eager")
    ours = genkit_generate(lm, PROMPTS, max_new_tokens=16)
    assert ours == hf_generate(lm, PROMPTS, max_new_tokens=16, do_sample=False)


def test_which_models_qualify(tiny, tiny_dir, tiny_t5_dir, monkeypatch):
    from genkit import models
    from genkit.models import LoadOptions
    from genkit.engine import static_runner

    assert static_runner.eligible(tiny.model)
    assert tiny.backend.kind != "static"  # a CPU model: the static cache only when asked
    assert models.load(str(tiny_dir), LoadOptions(backend="static-eager")).backend.kind == "static"
    with pytest.raises(GenkitError, match="--backend static: this model cannot use the static cache"):
        models.load(str(tiny_t5_dir), LoadOptions(backend="static"))
    assert not static_runner.eligible(models.load(str(tiny_t5_dir)).model)  # encoder-decoder
    assert not static_runner.eligible(models.load(str(tiny_dir), LoadOptions(load_in_4bit=True)).model)
    cfg = tiny.model.config
    monkeypatch.setattr(cfg, "sliding_window", 16, raising=False)
    assert not static_runner.eligible(tiny.model)  # the ready-made mask would drop the window


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_graph_replay_matches_eager_and_transformers(tiny_dir, monkeypatch):
    from genkit import models
    from genkit.models import LoadOptions

    lm = models.load(str(tiny_dir), LoadOptions(device_map="cuda"))
    assert lm.backend.kind == "static" and lm.backend.graphs  # the default on a GPU
    graphs = genkit_generate(lm, PROMPTS, max_new_tokens=40)
    assert lm.backend.kept is not None  # left for the next generation
    again = genkit_generate(lm, PROMPTS, max_new_tokens=40)  # replays the graphs it left
    lookup = genkit_generate(lm, PROMPTS[:1], max_new_tokens=40, prompt_lookup_num_tokens=5)
    eager = genkit_generate(on_backend(lm, "static-eager"), PROMPTS, max_new_tokens=40)
    assert graphs == again == eager == hf_generate(lm, PROMPTS, max_new_tokens=40, do_sample=False)
    assert lookup == graphs[:1]


def test_drafts_are_padded_to_a_power_of_two_without_changing_the_logits(tiny):
    plain, static = _runners(tiny, PROMPTS)
    with torch.inference_mode():
        plain.prefill(), static.prefill()
        for n in (3, 5, 1, 7):
            draft = torch.randint(100, 1000, (2, n))
            a, b = plain.step(draft), static.step(draft, hidden=True)
            assert b.logits.shape == a.logits.shape and len(b.hidden_states[-1][0]) == n
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
        assert static.filled == plain.length
        assert not static.cache.live[:, static.filled:].any()  # the padding's slots are dead

"""The real Gemma 3 270M Q4_K_M file (Q5_0, Q4_K, Q6_K, Q8_0 and F32 tensors; fetched once by
tests/real_gguf.py), run natively by default, against transformers' forward on the same file
dequantised to fp32."""

import warnings

import pytest
import torch

from genkit import models

import real_gguf

# needs_kernels, not a skipif: asking for the kernels at collection time, before the session's
# GENKIT_HOME is set, built them into the user's cache and every test then used that build.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("needs_kernels")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def gemma(genkit_home):
    return real_gguf.gemma3_270m(genkit_home)


def test_native_greedy_equals_dequantised_fp32(gemma):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    lm = models.load(str(gemma))
    assert lm.info == {"mode": "gguf-native", "architecture": "gemma3"}
    batch = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    runner = lm.model.native_runner(batch.input_ids, batch.attention_mask)
    token = runner.prefill().logits[:, -1].argmax(-1, keepdim=True)
    ours = [token]
    for _ in range(15):
        token = runner.step(token).logits[:, -1].argmax(-1, keepdim=True)
        ours.append(token)
    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(str(gemma.parent), gguf_file=gemma.name, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = ref.generate(**batch, do_sample=False, max_new_tokens=16, min_new_tokens=16)
    assert torch.equal(torch.cat(ours, 1), theirs[:, batch.input_ids.shape[1]:])


def test_models_lists_architecture_and_types(gemma):
    models.load(str(gemma))  # makes the entry (index, config, tokenizer) if a test before did not
    rows = [r for r in models.cached_entries() if r["source"] == str(gemma)]
    assert len(rows) == 1 and rows[0]["state"] == "ok" and rows[0]["architecture"] == "gemma3"
    assert set(rows[0]["types"]) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    assert rows[0]["size"] < 60_000_000  # config, tokenizer and index: no copy of the weights


def test_cached_tokenizer_equals_transformers(gemma):
    """Gemma's 262k-token vocabulary, converted once and read back from the cache (the second
    load), tokenizes and detokenizes as transformers' AutoTokenizer does from the file."""
    from transformers import AutoTokenizer

    models.load(str(gemma))
    ours = models.load(str(gemma)).tokenizer
    theirs = AutoTokenizer.from_pretrained(str(gemma.parent), gguf_file=gemma.name)
    texts = PROMPTS + ["  two  spaces\n\n\tand tabs", "<start_of_turn>user\nHi<end_of_turn>", "日本語, Ça va? 🙂 <unused7>"]
    for text in texts:
        ids = theirs(text).input_ids
        assert ours(text).input_ids == ids, text
        assert ours.decode(ids) == theirs.decode(ids), text
    assert ours.all_special_ids == theirs.all_special_ids and len(ours) == len(theirs)

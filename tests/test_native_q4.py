"""Native 4-bit mode: GGUF Q4 blocks mapped exactly onto torch's int4 kernel."""

import numpy as np
import pytest
import torch

from genkit import models


@pytest.fixture(scope="module")
def reader():
    from gguf import GGUFReader

    return GGUFReader(str(models.default_gguf_path()))


@pytest.fixture(scope="module")
def cached_weights(embedded_dir):
    from safetensors import safe_open

    return safe_open(str(embedded_dir / "model.safetensors"), "pt")


def test_q4_1_blocks_decode_like_transformers(reader, cached_weights):
    """Our reading of Q4_1 blocks gives exactly the weights transformers dequantised."""
    from genkit.native.q4 import _unpermute_rows, dequantize

    t = {x.name: x for x in reader.tensors}
    ours = dequantize(t["blk.3.ffn_down.weight"])
    theirs = cached_weights.get_tensor("model.layers.3.mlp.down_proj.weight")
    assert torch.equal(ours, theirs)
    # q rows come permuted for llama.cpp's rotary layout; undoing it gives transformers' q_proj
    q = dequantize(t["blk.3.attn_q.weight"])[_unpermute_rows(576, 9)]
    assert torch.equal(q, cached_weights.get_tensor("model.layers.3.self_attn.q_proj.weight"))
    emb = dequantize(t["token_embd.weight"])  # Q8_0
    assert torch.equal(emb, cached_weights.get_tensor("model.embed_tokens.weight"))


def test_int4_kernel_matches_dequantised_product(reader):
    from genkit.native.q4 import Int4Linear, dequantize

    t = {x.name: x for x in reader.tensors}
    layer = Int4Linear.from_gguf([t["blk.5.ffn_gate.weight"]])
    w = dequantize(t["blk.5.ffn_gate.weight"])
    x = torch.randn(3, w.shape[1]).to(torch.bfloat16)
    ref = x.float() @ w.T
    got = layer(x).float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.01  # bf16 rounding only


@pytest.mark.slow
def test_native_greedy_close_to_fp32_and_batch_consistent(embedded_dir):
    import genkit

    native = genkit.load(native_4bit=True)
    fp32 = genkit.load()
    prompts = ["What is the capital of France?", "Name three colours of the rainbow."]
    a = genkit.generate(native, prompts, max_new_tokens=16)
    b = genkit.generate(fp32, prompts, max_new_tokens=16)
    assert "Paris" in a.results[0].text
    # drift from the fp32 path: the first tokens agree
    for x, y in zip(a.results, b.results):
        assert x.token_ids[:4] == y.token_ids[:4]
    # a padded batch gives what each prompt gives alone
    alone = genkit.generate(native, prompts[1], max_new_tokens=16)
    assert alone.results[0].token_ids == a.results[1].token_ids

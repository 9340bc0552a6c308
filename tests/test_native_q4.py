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


PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow."]


@pytest.fixture(scope="module")
def fp32_ids(embedded):
    import genkit

    return [r.token_ids for r in genkit.generate(embedded, PROMPTS, max_new_tokens=24).results]


@pytest.mark.slow
def test_native_greedy_equals_fp32_with_genkit_kernels(fp32_ids):
    """genkit's kernels keep activations at int16 precision: greedy output is the fp32 path's."""
    import genkit
    from genkit.native import kernels

    if not kernels.available():
        pytest.skip("genkit's CPU kernels need AVX2 and a compiler")
    native = genkit.load(native_4bit=True)
    assert native.model.mode == "genkit-kernels"
    out = genkit.generate(native, PROMPTS, max_new_tokens=24)
    assert [r.token_ids for r in out.results] == fp32_ids
    assert "Paris" in out.results[0].text
    # a padded batch gives what each prompt gives alone
    alone = genkit.generate(native, PROMPTS[1], max_new_tokens=24)
    assert alone.results[0].token_ids == out.results[1].token_ids


@pytest.mark.slow
def test_native_close_to_fp32_with_torch_int4(embedded, monkeypatch):
    """Without genkit's kernels the mode falls back to torch's int4 kernel (bf16 activations)."""
    import genkit
    from genkit.native import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)
    native = genkit.load(native_4bit=True)
    assert native.model.mode == "torch-int4"
    # bf16 activations drift: close greedy choices may flip (the first prompt's top two tokens
    # are 0.08 apart in fp32), so compare the next-token logits instead of the text
    ids = native.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    ours = native.model.native_runner(ids, torch.ones_like(ids)).prefill().logits[0, -1]
    theirs = embedded.model(ids).logits[0, -1].detach()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.03
    assert len(set(ours.topk(5).indices.tolist()) & set(theirs.topk(5).indices.tolist())) >= 4
    out = genkit.generate(native, PROMPTS, max_new_tokens=24)
    alone = genkit.generate(native, PROMPTS[1], max_new_tokens=24)
    assert alone.results[0].token_ids == out.results[1].token_ids


def test_q8_0_blocks():
    """Weight-only int8: each weight within half a step of its block's scale, and the kernel's
    product over the blocks is the product of the weights they decode to."""
    from genkit.native import kernels
    from genkit.native.int8 import q8_0_blocks

    torch.manual_seed(0)
    w = torch.randn(48, 96)
    w[3, :32] = 0.0  # an all-zero block
    blocks = q8_0_blocks(w).reshape(48, 3, 34)
    scale = blocks[:, :, :2].contiguous().view(torch.float16).float()  # (48, 3, 1)
    codes = blocks[:, :, 2:].contiguous().view(torch.int8).float()
    decoded = (codes * scale).reshape(48, 96)
    assert ((w - decoded).abs().reshape(48, 3, 32) <= scale / 2 + 1e-6).all()
    assert torch.equal(decoded[3, :32], torch.zeros(32))
    if kernels.available():
        x = torch.randn(3, 96)
        y = kernels.gguf_matmul(x, q8_0_blocks(w), "Q8_0", 96)
        assert ((y - x @ decoded.T).norm() / (x @ decoded.T).norm()).item() < 1e-4


@pytest.mark.slow
def test_native_8bit_close_to_fp32(embedded):
    import genkit
    from genkit.native import kernels

    if not kernels.available():
        pytest.skip("genkit's CPU kernels need AVX2 and a compiler")
    q8 = genkit.load(native_8bit=True)
    assert q8.model.mode == "genkit-kernels-q8_0" and q8.info["mode"] == "native-8bit"
    ids = q8.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    ours = q8.model.native_runner(ids, torch.ones_like(ids)).prefill().logits[0, -1]
    theirs = embedded.model(ids).logits[0, -1].detach()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.02
    assert ours.argmax() == theirs.argmax()
    out = genkit.generate(q8, PROMPTS, max_new_tokens=24)
    alone = genkit.generate(q8, PROMPTS[1], max_new_tokens=24)
    assert alone.results[0].token_ids == out.results[1].token_ids
    assert "Paris" in out.results[0].text


def test_native_modes_exclude_each_other():
    from genkit.errors import GenkitError

    with pytest.raises(GenkitError, match="exclude each other"):
        models.load(None, models.LoadOptions(native_4bit=True, native_8bit=True))
    with pytest.raises(GenkitError, match="--native-8bit runs on the CPU from float32"):
        models.load(None, models.LoadOptions(native_8bit=True, dtype="bfloat16"))
    with pytest.raises(GenkitError, match="--int8-activations applies to genkit.s GGUF kernels"):
        models.load(None, models.LoadOptions(int8_activations=True))


@pytest.mark.slow
def test_int8_activations_in_the_layers_only(embedded):
    """--int8-activations: the layers' Q4 products take byte activations in decode steps (prompts
    go through decoded float blocks either way), the Q8_0 head keeps int16. Logits move (by 8% on this chat prompt: the small model's activations have outliers
    that a block's byte scale rounds the rest against), which can change the answer; the same
    input still gives the same output."""
    import genkit
    from genkit import prompts
    from genkit.native import kernels
    from genkit.native.q4 import GGUFLinear

    if not kernels.available():
        pytest.skip("genkit's CPU kernels need AVX2 and a compiler")
    exact = genkit.load(native_4bit=True)
    coarse = genkit.load(native_4bit=True, int8_activations=True)
    parts = [p for layer in coarse.model.layers for p in layer.values() if isinstance(p, GGUFLinear)]
    assert parts and all(p.byte_activations for p in parts)
    assert not coarse.model.head.byte_activations
    ids, mask, _ = prompts.encode(exact, [prompts.to_text(exact, PROMPTS[0])], templated=True, max_new_tokens=0)
    assert ids.shape[1] >= 16  # a prompt this long goes through the float panels in both modes
    with torch.inference_mode():
        runners = [exact.model.native_runner(ids, mask), coarse.model.native_runner(ids, mask)]
        a, b = [r.prefill().logits for r in runners]
        assert torch.equal(a, b)
        # A decode step's one row takes the byte products.
        token = a[:, -1:].argmax(-1)
        a, b = [r.step(token).logits for r in runners]
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-3 < rel < 0.15
    first = genkit.generate(coarse, PROMPTS, max_new_tokens=12).results
    again = genkit.generate(coarse, PROMPTS, max_new_tokens=12).results
    assert [r.token_ids for r in first] == [r.token_ids for r in again]


def test_versus_llama_cpp_on_the_same_file():
    """The bench's side-by-side: llama.cpp runs genkit's prompt ids from an empty cache each round."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a benchmark extra")
    import genkit
    from genkit import bench as B
    from genkit import models

    native = genkit.load(native_4bit=True)
    v = B.versus_llama_cpp(native, str(models.default_gguf_path()), new_tokens=6, rounds=2)
    assert v.new_tokens == 6 and v.llama_tps > 0 and v.genkit_tps > 0 and v.llama_ttft > 0
    # same weights, different activation rounding: the first tokens agree
    assert v.same_leading_tokens >= 3

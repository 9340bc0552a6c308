"""--native-4bit (the embedded model's GGUF through the native decoder) and --native-8bit."""

import pytest
import torch

from genkit import models


@pytest.fixture(scope="module")
def cached_weights(embedded_dir):
    from safetensors import safe_open

    return safe_open(str(embedded_dir / "model.safetensors"), "pt")


def test_q4_1_blocks_decode_like_transformers(cached_weights):
    """The embedded file's blocks as the native decoder reads them (gguf.quants) are exactly the
    weights transformers dequantised, once llama.cpp's q/k row order is undone."""
    import numpy as np

    from genkit.native.gguf_file import GGUFFile

    f = GGUFFile(models.default_gguf_path())
    assert torch.equal(f.floats("blk.3.ffn_down.weight"), cached_weights.get_tensor("model.layers.3.mlp.down_proj.weight"))
    # llama.cpp keeps q's rows in interleaved rotary pairs: row 2k of a head is transformers' row
    # k, row 2k + 1 its row k + 32 (head_dim 64)
    rotate_half_order = np.arange(576).reshape(9, 32, 2).swapaxes(1, 2).reshape(-1)
    q = f.floats("blk.3.attn_q.weight")[rotate_half_order]
    assert torch.equal(q, cached_weights.get_tensor("model.layers.3.self_attn.q_proj.weight"))
    emb = f.floats("token_embd.weight")  # Q8_0
    assert torch.equal(emb, cached_weights.get_tensor("model.embed_tokens.weight"))


PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow."]


@pytest.fixture(scope="module")
def fp32_ids(embedded):
    import genkit

    return [r.token_ids for r in genkit.generate(embedded, PROMPTS, max_new_tokens=24).results]


@pytest.mark.slow
@pytest.mark.usefixtures("needs_kernels")  # --native-4bit runs on the kernels
def test_native_4bit_greedy_equals_fp32(fp32_ids):
    """--native-4bit runs the embedded model's GGUF through the native decoder (as any .gguf runs
    by default); its int16 activations keep greedy output the fp32 path's."""
    import genkit

    native = genkit.load(native_4bit=True)
    assert native.model.mode == "gguf-native" and native.info["mode"] == "gguf-native"
    out = genkit.generate(native, PROMPTS, max_new_tokens=24)
    assert [r.token_ids for r in out.results] == fp32_ids
    assert "Paris" in out.results[0].text
    # a padded batch gives what each prompt gives alone
    alone = genkit.generate(native, PROMPTS[1], max_new_tokens=24)
    assert alone.results[0].token_ids == out.results[1].token_ids


def test_native_4bit_without_kernels_says_so(monkeypatch):
    from genkit.errors import GenkitError
    from genkit.native import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.raises(GenkitError, match="--native-4bit needs genkit's C\\+\\+ kernels"):
        models.load(None, models.LoadOptions(native_4bit=True))


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
@pytest.mark.usefixtures("needs_kernels")  # --native-4bit runs on the kernels
def test_int8_activations_reach_every_product(embedded):
    """--int8-activations: every integer product (the Q4_1 layers, the Q8_0 head) takes byte
    activations where it runs dot products (decode steps; prompts of 16 tokens or more decode the
    blocks to floats either way). Logits move (by several % on this chat prompt: the small
    model's activations have outliers that a block's byte scale rounds the rest against), which
    can change the answer; the same input still gives the same output."""
    import genkit
    from genkit import prompts
    from genkit.native import kernels

    exact = genkit.load(native_4bit=True)
    coarse = genkit.load(native_4bit=True, int8_activations=True)
    products = [L[name] for L in coarse.model.layers for name in ("qkv", "o", "gate_up", "down")] + [coarse.model.head]
    byte_codes = {kernels.kind_code(k, True) for k in ("Q4_1", "Q8_0")}
    assert {code for p in products for code in p.kinds} <= byte_codes
    ids, mask, _ = prompts.encode(exact, [prompts.to_text(exact, PROMPTS[0])], templated=True, max_new_tokens=0)
    with torch.inference_mode():
        runners = [exact.model.native_runner(ids, mask), coarse.model.native_runner(ids, mask)]
        a, _ = [r.prefill().logits for r in runners]
        token = a[:, -1:].argmax(-1)
        a, b = [r.step(token).logits for r in runners]  # one row: the byte products
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-3 < rel < 0.15
    first = genkit.generate(coarse, PROMPTS, max_new_tokens=12).results
    again = genkit.generate(coarse, PROMPTS, max_new_tokens=12).results
    assert [r.token_ids for r in first] == [r.token_ids for r in again]


@pytest.mark.usefixtures("needs_kernels")  # --native-4bit runs on the kernels
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

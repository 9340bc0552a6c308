"""genkit's CPU kernels (genkit/native/kernels.cpp) against plain float products."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genkit import models
from genkit.native import kernels

pytestmark = pytest.mark.usefixtures("needs_kernels")


def test_the_build_lands_in_the_tests_genkit_home(genkit_home):
    assert Path(genkit_home).resolve() in kernels.library().resolve().parents


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def gguf():
    """The embedded model's file as the native decoder reads it (GGUFFile)."""
    from genkit.native.gguf_file import GGUFFile

    return GGUFFile(models.default_gguf_path())


def _layer(f, name: str):
    """(a layer over the file's blocks of tensor `name`, its weight as gguf.quants dequantises it)."""
    from genkit.native.gguf_file import PartsLinear

    return PartsLinear.from_file(f, [name]), f.floats(name)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 37])
@pytest.mark.parametrize("name", ["blk.2.ffn_gate.weight", "blk.2.ffn_down.weight", "token_embd.weight"])
def test_gguf_product_equals_dequantised_product(gguf, name, rows):
    """Q4_1 layers and the Q8_0 head of the embedded model: the product of the raw blocks is the
    product of the dequantised weights to about 1e-5 (the int16 activations' rounding below 16
    rows, 16 bits per 32 inputs in the integer panels from 8 rows)."""
    layer, w = _layer(gguf, name)
    torch.manual_seed(rows)
    x = torch.randn(rows, w.shape[1])
    assert layer.kinds == [kernels.kind_code(gguf.type_of(name))]
    assert _rel(layer(x), x @ w.T) < 1e-4


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("name", ["blk.2.ffn_gate.weight", "blk.2.ffn_down.weight", "token_embd.weight"])
def test_byte_activations_product(gguf, name, rows):
    """The same blocks times activations quantised to signed bytes (Q4_1 unsigned codes, the
    Q8_0 head's signed ones): within byte rounding of the exact product (~4e-3), and not the
    int16 product (which a kernel that ignored the flag would return)."""
    from genkit.native.gguf_file import GGUFFile

    exact, w = _layer(gguf, name)
    coarse, _ = _layer(GGUFFile(gguf.path, byte_activations=True), name)
    torch.manual_seed(rows)
    x = torch.randn(rows, w.shape[1])
    ref = x @ w.T
    assert 1e-3 < _rel(coarse(x), ref) < 1.5e-2
    assert _rel(exact(x), ref) < 1e-4


def test_q4_0_blocks():
    """Q4_0 (w = (q - 8) d): blocks built here, checked against their float weights."""
    rng = np.random.default_rng(0)
    out, inp = 40, 96
    codes = rng.integers(0, 16, size=(out, inp // 32, 32), dtype=np.uint8)
    d = (rng.random((out, inp // 32)) * 0.02).astype(np.float16)
    blocks = np.zeros((out, inp // 32, 18), dtype=np.uint8)
    blocks[:, :, :2] = d.view(np.uint8).reshape(out, inp // 32, 2)
    blocks[:, :, 2:] = codes[:, :, :16] | (codes[:, :, 16:] << 4)
    w = torch.from_numpy(((codes.astype(np.float32) - 8) * d.astype(np.float32)[..., None]).reshape(out, inp))
    for rows in (5, 20):  # int16 dot products; the integer panels
        x = torch.randn(rows, inp)
        y = kernels.gguf_matmul(x, torch.from_numpy(blocks.reshape(-1)), "Q4_0", inp)
        assert _rel(y, x @ w.T) < 1e-4
    x = torch.randn(5, inp)
    y8 = kernels.gguf_matmul(x, torch.from_numpy(blocks.reshape(-1)), "Q4_0", inp, byte_activations=True)
    assert _rel(y8, x @ w.T) < 1.5e-2


def test_fused_rms_norm(gguf):
    layer, w = _layer(gguf, "blk.0.attn_q.weight")
    norm = gguf.floats("blk.0.attn_norm.weight")
    x = torch.randn(2, 576) * 3
    ref = F.rms_norm(x, (576,), norm, 1e-5) @ w.T
    assert _rel(layer(x, norm, 1e-5), ref) < 1e-4


# 1-8 rows: one weight row streamed; 9-256: panels of 8 rows, tiles of 6 weight rows x 2 panels
# (the row and column counts here leave every kind of partial tile: a lone panel, a partly
# filled one, fewer than 6 weight rows); 257: torch's product.
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 13, 24, 31, 64, 257])
@pytest.mark.parametrize("shape", [(64, 576), (37, 45), (39, 40)])  # odd sizes take the scalar tails
def test_dense_product(rows, shape):
    w = torch.randn(*shape)
    x = torch.randn(rows, shape[1])
    assert torch.allclose(kernels.dense_matmul(x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(RuntimeError, match="features"):
        kernels.dense_matmul(torch.randn(1, 10), torch.randn(4, 12))


def test_fast_decoder_runs_fp32_llama_and_shares_weights(tiny):
    """The engine decodes an fp32 Llama with genkit's decoder (so every parity test against
    transformers covers it), hidden states included."""
    from genkit.native.runner import NativeRunner

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    runner = tiny.backend.runner(ids, torch.ones_like(ids))
    assert isinstance(runner, NativeRunner)
    ours = runner.prefill(hidden=True).hidden_states
    theirs = tiny.model(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)
    attn = tiny.model.model.layers[0].self_attn
    fused = tiny.backend.fast.layers[0]["qkv"].weight
    assert attn.k_proj.weight.data_ptr() == fused.data_ptr() + attn.q_proj.weight.numel() * 4


def test_the_backend_is_chosen_at_load(tiny_dir):
    """models.load builds genkit's decoder (while the tokenizer loads); backend="transformers"
    keeps transformers' forward, and the runners say which they are."""
    from genkit import models
    from genkit.engine.runner import Runner
    from genkit.native.llama import FastLlama
    from genkit.native.runner import NativeRunner

    ids = torch.tensor([[5, 6, 7]])
    lm = models.load(str(tiny_dir))
    assert lm.backend.kind == "genkit" and isinstance(lm.backend.fast, FastLlama)
    assert isinstance(lm.backend.runner(ids, torch.ones_like(ids)), NativeRunner)
    plain = models.load(str(tiny_dir), models.LoadOptions(backend="transformers"))
    assert plain.backend.kind == "transformers" and plain.backend.fast is None
    assert type(plain.backend.runner(ids, torch.ones_like(ids))) is Runner


def test_fast_decoder_off_for_other_dtypes(tiny_dir):
    from genkit import models

    bf16 = models.load(str(tiny_dir), models.LoadOptions(dtype="bfloat16"))
    assert bf16.backend.kind == "transformers" and bf16.backend.fast is None


def test_glu_input_fused(gguf):
    """silu(gate) * up computed inside the product, for both weight kinds."""
    layer, w = _layer(gguf, "blk.1.ffn_down.weight")
    gate_up = torch.randn(3, 2 * 1536)
    ref = (F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]) @ w.T
    assert _rel(layer(gate_up, glu=True), ref) < 1e-4
    assert _rel(kernels.dense_matmul(gate_up, w, glu=True), ref) < 1e-5


def test_decode_attention_equals_the_torch_path(tiny, monkeypatch):
    """The fused rotary + KV write + attention call gives the logits of the torch ops it
    replaces, on a left-padded batch over several steps."""
    from genkit.native import llama

    fast = tiny.backend.fast
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])

    def logits(fused: bool):
        monkeypatch.setattr(llama.kernels, "available", lambda: fused)
        runner = fast.native_runner(ids, mask)
        out = [runner.prefill().logits]
        for tok in ([[3], [4]], [[21], [22]], [[7], [9]]):
            out.append(runner.step(torch.tensor(tok)).logits)
        return torch.cat(out, dim=1)

    assert torch.allclose(logits(True), logits(False), atol=1e-5)


def _step_logits(fast, ids, mask, steps, hidden=False):
    runner = fast.native_runner(ids, mask)
    out = [runner.prefill().logits]
    for tok in steps:
        step = runner.step(torch.tensor(tok), hidden=hidden)
        out.append(step.logits)
        out.extend(step.hidden_states or ())
    return torch.cat([t.flatten(1) for t in out], dim=1)


def test_decode_stack_equals_layer_by_layer(tiny):
    """The C++ DecodeStack (every layer of a decode step in one call) gives bit for bit the
    logits of the per-layer calls it replaces, on a left-padded batch over several steps."""
    fast = tiny.backend.fast
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    steps = ([[3], [4]], [[21], [22]], [[7], [9]])
    assert fast.decode_stack() is not None
    stacked = [_step_logits(fast, ids, mask, steps, hidden) for hidden in (False, True)]
    fast.stacked = False
    try:
        assert fast.decode_stack() is None
        for hidden, ours in zip((False, True), stacked):  # hidden states too (DoLa, contrastive)
            assert torch.equal(ours, _step_logits(fast, ids, mask, steps, hidden))
    finally:
        fast.stacked = True


@pytest.mark.parametrize("rows", [1, 5, 30, 200])  # 200: beyond the kernels' rows, torch's bf16 product
def test_bf16_dense_product(rows):
    w = torch.randn(64, 576).to(torch.bfloat16)
    x = torch.randn(rows, 576)
    assert _rel(kernels.dense_matmul(x, w), F.linear(x, w.float())) < (1e-6 if rows <= 128 else 1e-2)


def test_candidate_steps_keep_the_winners_cache(tiny):
    """Contrastive search's cache bookkeeping: rows expanded k times, one candidate kept per row,
    again and again (past the cache's first capacity), then a plain step. Every logit equals
    that of a runner fed only the winners."""
    fast = tiny.backend.fast
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    k, gen = 3, torch.Generator().manual_seed(0)
    runner, reference = fast.native_runner(ids, mask), fast.native_runner(ids, mask)
    runner.prefill(), reference.prefill()
    for _ in range(70):  # capacity starts at 64 slots
        candidates = torch.randint(20, 400, (2 * k, 1), generator=gen)
        runner.repeat_interleave(k)
        out = runner.step(candidates).logits
        choice = torch.randint(0, k, (2,), generator=gen)
        winners = torch.arange(2) * k + choice
        runner.select(winners)
        expected = reference.step(candidates[winners]).logits
        assert torch.allclose(out[winners], expected, atol=1e-5)
    plain = torch.tensor([[30], [31]])
    assert torch.allclose(runner.step(plain).logits, reference.step(plain).logits, atol=1e-5)
    assert runner.cache.keys.shape[1] == 2  # back to one cache row per row


def test_native_cache_sized_by_the_expected_length(tiny):
    """The KV cache starts at what the caller expects the sequences to reach (the engine passes
    prompt + max_new_tokens), at most 512 slots past the prompt, in multiples of 64, and grows by
    doubling past it with the same logits."""
    fast = tiny.backend.fast
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids)
    sizes = [fast.native_runner(ids, mask, capacity=c).cache.capacity for c in (None, 200, 10_000)]
    assert sizes == [64, 256, 576]
    runner, roomy = fast.native_runner(ids, mask), fast.native_runner(ids, mask, capacity=200)
    token = torch.tensor([[9]])
    runner.prefill(), roomy.prefill()
    for i in range(70):
        assert torch.equal(runner.step(token).logits, roomy.step(token).logits)
    assert runner.cache.capacity == 128 and roomy.cache.capacity == 256


@pytest.mark.parametrize("d", [12, 64, 96, 128])  # 12: the scalar path; 96: 64 + 32 lanes
@pytest.mark.parametrize("slot", [0, 7, 8, 70])
@pytest.mark.parametrize("interleaved", [False, True])
def test_decode_attention_kernel(d, slot, interleaved):
    """Rotary embedding, cache write and attention of one token per row against torch, for
    head sizes and context lengths on and off the kernel's blocks of 8, with left padding; the
    rotary pairs (k, k + d/2) or, as llama.cpp stores Llama's q/k rows, (2k, 2k + 1)."""
    B, hq, hk, cap = 3, 6, 2, 80
    gen = torch.Generator().manual_seed(d + slot)
    qkv = torch.randn(B, (hq + 2 * hk) * d, generator=gen)
    cos, sin = torch.randn(B, d, generator=gen), torch.randn(B, d, generator=gen)
    k, v = torch.randn(B, hk, cap, d, generator=gen), torch.randn(B, hk, cap, d, generator=gen)
    first = torch.tensor([0, min(slot, 3), slot])
    k_ref, v_ref = k.clone(), v.clone()
    out = kernels.decode_attention(qkv, cos, sin, k, v, slot, first, hq, hk, interleaved)

    partner = (lambda x: x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)) if interleaved else \
        (lambda x: x.roll(d // 2, dims=-1))
    rot = lambda x: x * cos[:, None] + partner(x) * sin[:, None]
    parts = qkv.view(B, hq + 2 * hk, d)
    q, k_ref[:, :, slot], v_ref[:, :, slot] = rot(parts[:, :hq]), rot(parts[:, hq:hq + hk]), parts[:, hq + hk:]
    assert torch.allclose(k, k_ref, atol=1e-6) and torch.equal(v, v_ref)  # only slot `slot` written
    keys = k_ref[:, :, : slot + 1].repeat_interleave(hq // hk, dim=1)
    values = v_ref[:, :, : slot + 1].repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q, keys) / d**0.5
    scores = scores.masked_fill(torch.arange(slot + 1)[None, None] < first[:, None, None], float("-inf"))
    expected = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values).reshape(B, hq * d)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)


def test_the_avx2_build_compiles_on_a_vnni_cpu():
    """On a CPU with AVX-512 VNNI the build takes the fused-instruction branches; the AVX2
    branches, which other CPUs build, must still compile (checked without linking: seconds)."""
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    if kernels.build_flags() == kernels.CFLAGS:
        pytest.skip("this CPU builds the AVX2 branches already (test_the_build_lands_in_the_tests_genkit_home)")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    done = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", *kernels.CFLAGS, *includes, str(kernels.SOURCE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

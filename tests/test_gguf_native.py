"""genkit's native GGUF decoder (genkit/native/decoder.py) against transformers' own forward on
the same file: tiny random models of each architecture, written as GGUF files the way
llama.cpp writes them (tests/gguf_writer.py), in the block formats of llama.cpp's mixes.
transformers dequantises the file to fp32 and runs its model; genkit multiplies the blocks as
they are, with the activations quantised to 16 bits per 32 inputs (about 1.5e-5 of a block's
largest value; the integer products' only rounding besides float32's). Logits agree to 5e-4 of
their largest magnitude (measured on these models: 4e-5 to 2.2e-4 through their layers, against
about 1e-6 with float products) and greedy tokens are the same."""

import warnings

import pytest
import torch

from genkit.errors import GenkitError
from genkit.native import kernels

import gguf_writer

pytestmark = pytest.mark.usefixtures("needs_kernels")

Q4_K_M = {"*": "Q4_K", "attn_v.weight": "Q6_K", "ffn_down.weight": "Q6_K", "token_embd.weight": "Q8_0"}
GEMMA_MIX = {"*": "Q5_0", "attn_v.weight": "Q8_0", "attn_output.weight": "Q4_K", "ffn_down.weight": "Q6_K",
             "token_embd.weight": "Q8_0"}
CASES = {
    "llama": ("llama", {}, "Q4_0"),
    "llama-q4_k_m": ("llama", {"tie_word_embeddings": True}, Q4_K_M),
    "qwen2": ("qwen2", {}, {"*": "Q5_1", "attn_q.weight": "Q3_K", "ffn_gate.weight": "Q2_K"}),
    "qwen3": ("qwen3", {"head_dim": 128}, {"*": "Q5_K", "attn_output.weight": "F16", "ffn_up.weight": "Q4_1"}),
    "gemma2": ("gemma2", {}, "Q8_0"),
    "gemma3": ("gemma3_text", {"num_hidden_layers": 6}, GEMMA_MIX),  # five sliding layers, one global
    "phi3": ("phi3", {}, {"*": "Q4_K", "attn_qkv.weight": "Q5_0", "ffn_down.weight": "Q6_K"}),  # fused qkv, gate/up
}


def load_both(path):
    """(transformers' model from the dequantised file, genkit's native model of the file)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging

    from genkit.native.decoder import GGUFDecoder

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return ref, GGUFDecoder(path, config, GenerationConfig.from_model_config(config))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    model_type, overrides, types = CASES[request.param]
    model = gguf_writer.random_model(gguf_writer.tiny_config(model_type, **overrides))
    path = gguf_writer.write(model, tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", types)
    return load_both(path)


def prompts():
    """Two left-padded rows of 24 and 17 tokens: longer than gemma's sliding window of 8."""
    torch.manual_seed(0)
    ids = torch.randint(3, 320, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    return ids, mask


def test_logits_equal_transformers(pair):
    from genkit.native.kv_cache import StaticKV

    ref, native = pair
    ids, mask = prompts()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    got = native.forward(ids, positions, StaticKV(native, 2, 64), 0, mask, 0)
    real = mask.bool()
    assert (got - want)[real].abs().max() <= 5e-4 * want[real].abs().max()


def test_greedy_tokens_equal_transformers(pair):
    """Prompt, then one token per step through genkit's runner (the KV cache, the decode path)."""
    ref, native = pair
    ids, mask = prompts()
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                            pad_token_id=0)[:, ids.shape[1]:]
    runner = native.native_runner(ids, mask)
    token = runner.prefill().logits[:, -1].argmax(-1, keepdim=True)
    got = [token]
    for _ in range(11):
        token = runner.step(token).logits[:, -1].argmax(-1, keepdim=True)
        got.append(token)
    assert torch.equal(torch.cat(got, 1), want)


def test_byte_activations_decode_close_to_exact(tmp_path):
    """--int8-activations on a .gguf: a decode step's products (one row: the integer paths) take
    activations quantised to bytes, as llama.cpp does. The logits stay within byte rounding of the
    exact ones, and differ from them (the flag reached the kernels). Weights quantised from the
    model's own (random k-quant blocks have weights far from zero-mean, whose large cancelling
    sums magnify any rounding; tests/test_gguf_formats.py checks those products one by one)."""
    from transformers import AutoConfig, GenerationConfig

    from genkit.native.decoder import GGUFDecoder
    from genkit.native.kv_cache import StaticKV

    model = gguf_writer.random_model(gguf_writer.tiny_config("llama", tie_word_embeddings=True))
    path = gguf_writer.write(model, tmp_path / "q5_0.gguf", {"*": "Q5_0", "token_embd.weight": "Q8_0"})
    config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    exact, coarse = (GGUFDecoder(path, config, GenerationConfig.from_model_config(config), byte_activations=b)
                     for b in (False, True))
    assert set(coarse.head.kinds) == {kernels.kind_code("Q8_0", True)}
    ids = torch.tensor([[5, 17, 42, 9]])
    logits = []
    for m in (exact, coarse):
        cache = StaticKV(m, 1, 16)
        for i in range(ids.shape[1]):  # one token at a time: the decode path
            out = m.forward(ids[:, i:i + 1], torch.tensor([[i]]), cache, i, torch.ones(1, i + 1, dtype=torch.long), 1)
        logits.append(out[0, -1])
    scale = logits[0].abs().max()
    assert 1e-6 * scale < (logits[1] - logits[0]).abs().max() < 3e-2 * scale


def test_llama3_rope_scaling_from_the_files_rope_freqs(tmp_path):
    """Llama 3.1+ files carry their rope scaling as rope_freqs.weight (transformers' GGUF reader
    ignores it): genkit's logits equal transformers' on the original model with its llama3
    rope_parameters (F32 weights: nothing rounded), and not those without the scaling."""
    from genkit.native.kv_cache import StaticKV

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = gguf_writer.random_model(gguf_writer.tiny_config("llama", rope_parameters=rope))
    path = gguf_writer.write(model, tmp_path / "llama3.gguf", "F32")
    unscaled, native = load_both(path)
    ids, mask = prompts()
    with torch.no_grad():
        want, plain = (m(ids, attention_mask=mask).logits for m in (model, unscaled))
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    got = native.forward(ids, positions, StaticKV(native, 2, 64), 0, mask, 0)
    real, scale = mask.bool(), want.abs().max()
    assert (got - want)[real].abs().max() <= 1e-4 * scale
    assert (plain - want)[real].abs().max() > 1e-2 * scale


def test_native_config_reads_as_the_architectures_own():
    """load_native reads config.json as a plain PretrainedConfig (the architecture's class would
    import transformers' modelling code): the rotary tables come out the same for every rope
    type the decoder meets."""
    from transformers import AutoConfig, PretrainedConfig

    from genkit.native.decoder import _inverse_frequencies

    cases = [("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
             ("llama", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
             ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}),
             ("gemma3_text", {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})]
    for model_type, rope in cases:
        own = gguf_writer.tiny_config(model_type, rope_parameters=rope)
        plain = PretrainedConfig.from_dict(own.to_dict())
        for layer_type in (["full_attention", "sliding_attention"] if model_type.startswith("gemma") else [None]):
            (a, fa), (b, fb) = _inverse_frequencies(own, layer_type), _inverse_frequencies(plain, layer_type)
            assert torch.equal(a, b) and fa == fb, (model_type, layer_type)


def test_unsupported_block_type_names_the_tensor(tmp_path):
    import gguf
    import numpy as np

    from genkit.native.gguf_file import GGUFFile

    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 136), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_XS)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(GenkitError, match=r"iq.gguf: tensor blk.0.attn_q.weight is IQ4_XS, which genkit cannot run "
                                          r"natively; .*Q4_K_M"):
        GGUFFile(path).check_types(["blk.0.attn_q.weight"])


def test_unknown_architecture_is_refused(tmp_path):
    import gguf

    from genkit.native.decoder import GGUFDecoder

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(GenkitError, match="architecture 'mamba' does not run natively"):
        GGUFDecoder(path, None, None)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    model = gguf_writer.random_model(gguf_writer.tiny_config("qwen3", head_dim=128, num_hidden_layers=1))
    return gguf_writer.write(model, tmp_path_factory.mktemp("bad") / "tiny.gguf", "Q8_0")


def _native_entries(home):
    return sorted((home / "cache" / "models").glob("*native*")) if (home / "cache" / "models").is_dir() else []


def test_file_without_tokenizer_fails_cleanly(tiny_file, genkit_home):
    from conftest import run_cli

    before = _native_entries(genkit_home)
    r = run_cli("run", "--model", str(tiny_file), "Hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "tiny.gguf has no tokenizer in its metadata" in r.stderr
    assert _native_entries(genkit_home) == before  # nothing half-written left in the cache


def test_truncated_file_fails_cleanly(tiny_file, tmp_path, genkit_home):
    from conftest import run_cli

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    r = run_cli("run", "--model", str(cut), "Hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cut.gguf" in r.stderr and ("corrupt GGUF" in r.stderr or "truncated" in r.stderr)


def test_rotary_tables_grow_with_the_positions_in_use(tmp_path):
    """A plain (llama) stack's rotary tables are computed for the positions in use, not for every
    position the config allows (131k for Llama 3: 67 MB), and extend to cover later ones; their
    columns follow the q/k rows' interleaved pairs."""
    from transformers import AutoConfig, GenerationConfig

    from genkit.native.decoder import GGUFDecoder

    model = gguf_writer.random_model(gguf_writer.tiny_config("llama", max_position_embeddings=8192))
    path = gguf_writer.write(model, tmp_path / "long.gguf", "Q8_0")
    config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    native = GGUFDecoder(path, config, GenerationConfig.from_model_config(config))
    assert native.cos.shape[0] == 1024
    native.cover_positions(torch.tensor([[3000]]))
    assert native.cos.shape[0] >= 3001
    inv = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, native.head_dim, 2).double() / native.head_dim))
    angles = 3000 * inv
    # llama.cpp's q/k rows come in interleaved pairs (2k, 2k + 1), and the tables with them
    pairs = lambda a, b: torch.stack([a, b], -1).flatten()
    torch.testing.assert_close(native.cos[3000].double(), pairs(angles, angles).cos(), atol=2e-4, rtol=0)
    torch.testing.assert_close(native.sin_signed[3000].double(), pairs(-angles, angles).sin(), atol=2e-4, rtol=0)

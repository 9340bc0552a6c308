"""Tiny random models written as GGUF files the way llama.cpp's converter writes them, for the
native GGUF tests: tensor names from gguf's own name map, llama's q/k row permutation, gemma's
norms stored as 1 + w, weights quantised with gguf.quants (or, for the k-quants, which gguf
cannot quantise, random blocks of that format)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3}
# Random k-quant blocks: fp16 scale fields and the size that keeps weights around 0.05.
K_SCALES = {"Q2_K": ([80, 82], 2e-3), "Q3_K": ([108], 2e-3), "Q4_K": ([0, 2], 3e-4), "Q5_K": ([0, 2], 1.5e-4),
            "Q6_K": ([208], 2e-4)}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    base = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=256, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type.startswith("gemma"):
        base.update(sliding_window=8, query_pre_attn_scalar=64, tie_word_embeddings=True)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def random_model(config, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their initial 1 / 0, so that they count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def llama3_divisors(cfg) -> np.ndarray:
    """Llama 3's rope scaling as llama.cpp's converter stores it (rope_freqs.weight): per
    frequency, the plain inverse frequency over the scaled one transformers computes."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = cfg.head_dim
    plain = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    return (plain / scaled).numpy().astype(np.float32)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (rotate-half pairs made interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[kind]
    per, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)
    fields, scale = K_SCALES[kind]
    for at in fields:
        d = rng.uniform(0, scale, blocks.shape[:2]).astype(np.float16)
        blocks[:, :, at:at + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def write(model, path: Path, types: dict[str, str] | str = "Q8_0", seed: int = 0, tokenizer: str | None = None) -> Path:
    """`model` (a transformers causal LM) as a GGUF file at `path`. `types`: one GGML type for
    every matrix, or {GGUF tensor name suffix: type} with "*" as the default (norms and biases
    are F32 as llama.cpp writes them). `tokenizer`: "gpt2" or "llama" to add one (add_tokenizer)."""
    cfg = model.config
    arch = ARCHS[cfg.model_type]
    name = gguf.MODEL_ARCH_NAMES[arch]
    writer = gguf.GGUFWriter(str(path), name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)  # else phi3's default (32000) lies outside a tiny vocabulary
    if tokenizer:
        add_tokenizer(writer, tokenizer, cfg.vocab_size)
    rope = cfg.rope_parameters
    writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_divisors(cfg))
    if getattr(cfg, "sliding_window", None) and cfg.model_type.startswith("gemma"):
        writer.add_sliding_window(cfg.sliding_window)
    if cfg.model_type == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    rng = np.random.default_rng(seed)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        w = tensor.float().numpy()
        if cfg.model_type.startswith("gemma") and hf_name.endswith("norm.weight"):
            w = w + 1
        if cfg.model_type == "llama" and "q_proj" in hf_name:
            w = _permute(w, cfg.num_attention_heads)
        if cfg.model_type == "llama" and "k_proj" in hf_name:
            w = _permute(w, cfg.num_key_value_heads)
        if w.ndim == 1:
            writer.add_tensor(gguf_name, w.astype(np.float32))
            continue
        kind = types if isinstance(types, str) else next(
            (t for suffix, t in types.items() if suffix != "*" and gguf_name.endswith(suffix)), types["*"])
        if kind in K_SCALES:
            writer.add_tensor(gguf_name, _k_blocks(kind, *w.shape, rng), raw_dtype=gguf.GGMLQuantizationType[kind])
        elif kind == "F32":
            writer.add_tensor(gguf_name, w.astype(np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(gguf_name, quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- tokenizers in the metadata

BIGRAMS = ("th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de "
           "hi ri ro ic ne ea ra ce li ch ll be ma si om ur el").split()


def add_tokenizer(writer, kind: str, vocab_size: int = 320) -> None:
    """A small real tokenizer in the file's metadata, as llama.cpp's converter writes one, so that
    genkit (and transformers) build it from the file: `gpt2` (byte-level BPE with merges, as
    SmolLM2 and Llama 3 files carry) or `llama` (sentencepiece with byte fallback and no merges,
    as Gemma files carry). Ids 0, 1, 2 are pad, bos and eos, as tiny_config says."""
    if kind == "gpt2":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte = bytes_to_unicode()
        tokens = ["<pad>", "<s>", "</s>"] + [byte[b] for b in range(256)]
        merges = [f"Ġ {c}" for c in "etaoinsrhl"] + [f"{a} {b}" for a, b in BIGRAMS]
        tokens += [m.replace(" ", "") for m in merges]
        types = [3, 3, 3] + [1] * (len(tokens) - 3)
        writer.add_token_merges(merges[:vocab_size - 259])
        writer.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    else:
        tokens = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
        tokens += ["▁"] + list("abcdefghijklmnopqrstuvwxyz") + ["▁" + c for c in "tao"] + BIGRAMS
        types = [3, 3, 3, 2] + [6] * 256 + [1] * (len(tokens) - 260)
        writer.add_unk_token_id(3)
        writer.add_add_bos_token(True)
    tokens, types = tokens[:vocab_size], types[:vocab_size]
    assert len(tokens) == vocab_size, len(tokens)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([-float(i) for i in range(vocab_size)])

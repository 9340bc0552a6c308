"""Shared fixtures: tiny random models (fast) and the embedded default model (real).

Everything genkit writes goes under one GENKIT_HOME per test session, so the embedded model is
converted once (about 30 s) and reused by every test that needs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def genkit_home(tmp_path_factory) -> Path:
    home = Path(os.environ.get("GENKIT_TEST_HOME") or tmp_path_factory.mktemp("genkit-home"))
    os.environ["GENKIT_HOME"] = str(home)
    return home


def kernel_toolchain() -> bool:
    """AVX2, a C++ compiler and ninja: where genkit's CPU kernels can and so must build."""
    import torch
    from torch.utils.cpp_extension import is_ninja_available

    if os.environ.get("GENKIT_NO_KERNELS") == "1":
        return False
    compiler = shutil.which(os.environ.get("CXX") or "c++")
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and compiler is not None \
        and is_ninja_available()


@pytest.fixture(scope="session", autouse=True)
def kernels_built(genkit_home) -> bool:
    """Build genkit's CPU kernels once, up front, into the tests' GENKIT_HOME: the first build
    takes about a minute and prints a line on stderr, which must not land inside a CLI test's
    timeout or its output. Where they can build (or GENKIT_REQUIRE_KERNELS=1, as in CI) a
    failed build stops the run: the fallback to torch's products would pass every parity test
    and hide it."""
    from genkit.native import kernels

    if kernel_toolchain():
        os.environ["GENKIT_REQUIRE_KERNELS"] = "1"
    try:
        return kernels.available()
    except RuntimeError as exc:
        pytest.exit(f"genkit's CPU kernels must build on this machine: {exc}", returncode=1)


@pytest.fixture
def needs_kernels(kernels_built):
    """For tests of the kernels themselves (`pytestmark = pytest.mark.usefixtures(...)`): decided
    once the session's GENKIT_HOME is set, never at collection, when a build would land in the
    user's cache. Skipped only without a toolchain; with one, a failed build stopped the run."""
    if not kernels_built:
        pytest.skip("genkit's CPU kernels need AVX2, a C++ compiler and ninja")


@pytest.fixture(scope="session")
def embedded_dir(genkit_home) -> Path:
    """The embedded SmolLM2 converted into the cache (a transformers directory)."""
    from genkit import models

    return models.prepare_gguf(models.default_gguf_path(), default=True)


@pytest.fixture(scope="session")
def fixture_models(tmp_path_factory, embedded_dir):
    """The models transformers 4.55's fixtures were recorded on (tests/parity455.py), each loaded once."""
    import parity455

    return parity455.ModelCache(tmp_path_factory, embedded_dir)


@pytest.fixture(scope="session")
def embedded(embedded_dir):
    """The embedded model, loaded once."""
    from genkit import models

    return models.load(None)


def _save_tiny(path: Path, config, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), tiny_llama_config(), embedded_dir)


# A second end token that the tiny model's beams reach within a few steps (its weights are
# the `tiny` fixture's): several end tokens, as Gemma's or Llama 3's configs list them.
SECOND_EOS = 1682


@pytest.fixture(scope="session")
def tiny_two_eos(tmp_path_factory, embedded_dir):
    """The `tiny` model with a config that lists two end tokens: [2, SECOND_EOS]."""
    from genkit import models

    path = _save_tiny(tmp_path_factory.mktemp("tiny-two-eos"), tiny_llama_config(eos_token_id=[2, SECOND_EOS]),
                      embedded_dir)
    return models.load(str(path))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from genkit import models

    return models.load(str(tiny_dir))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, embedded_dir) -> Path:
    """A tiny random T5 (encoder-decoder) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-t5")
    cfg = T5Config(
        vocab_size=49152, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=2, eos_token_id=2, decoder_start_token_id=2,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(path)
    return path


def run_cli(*args, input: str | None = None, env: dict | None = None, timeout: int = 300):
    """Run the real `genkit` command in a subprocess (no terminal)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "genkit", *args], input=input, capture_output=True, text=True,
        env=full_env, timeout=timeout,
    )

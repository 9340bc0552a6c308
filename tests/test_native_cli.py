"""The commands on the native GGUF path: `genkit batch` (continuous batching for greedy and
sampling records, padded batches for beam search), `genkit compare` and `genkit bench` on tiny
random GGUF files with a tokenizer in their metadata, each record checked against the same file
dequantised and run through transformers' forward (see test_native_strategies.py)."""

from __future__ import annotations

import json

import pytest

import gguf_writer
from test_batch import cli, records, write_jsonl

pytestmark = pytest.mark.usefixtures("needs_kernels")

ARCHS = {"llama": ("llama", {}, "gpt2"), "gemma3": ("gemma3_text", {"num_hidden_layers": 6}, "llama")}
RECORDS = [
    {"id": "a", "prompt": "the cat sat on the mat and the"},
    {"id": "b", "prompt": "hello"},
    {"id": "c", "prompt": "once upon a time", "params": {"do_sample": True, "seed": 11, "temperature": 0.8}},
    {"id": "d", "prompt": "the ant", "params": {"num_beams": 2}},
    {"id": "e", "prompt": "a", "params": {"do_sample": True, "seed": 12}},
]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def gguf(request, tmp_path_factory):
    model_type, overrides, tokenizer = ARCHS[request.param]
    model = gguf_writer.random_model(gguf_writer.tiny_config(model_type, **overrides))
    return gguf_writer.write(model, tmp_path_factory.mktemp("native-cli") / "model.gguf", "Q8_0", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def reference(gguf, genkit_home):
    """The dequantised model, run by transformers' forward (not genkit's fp32 decoder)."""
    from genkit import models

    return models.load(str(gguf), models.LoadOptions(dequantize=True, backend="transformers"))


def _text(lm, prompt, **params) -> str:
    from genkit import api

    return api.generate(lm, prompt, raw=True, **params).text


def test_batch_records_equal_the_dequantized_path(gguf, reference, tmp_path):
    from genkit import api, models
    from genkit.engine import continuous

    native = models.load(str(gguf))
    assert native.info["mode"] == "gguf-native"
    assert continuous.supported(native, api.settings_for(native)[1])  # so greedy and sampling batch continuously
    out = tmp_path / "out.jsonl"
    code, _, err = cli("batch", write_jsonl(tmp_path / "in.jsonl", RECORDS), "-o", out, "--model", gguf, "--raw",
                       "-n", "6", "--batch-size", "2")
    assert code == 0, err
    got = {r["id"]: r for r in records(out)}
    assert list(got) == [r["id"] for r in RECORDS]
    for rec in RECORDS:
        params = dict(rec.get("params", {}))
        params.setdefault("seed", got[rec["id"]]["seed"])
        assert got[rec["id"]]["text"] == _text(reference, rec["prompt"], max_new_tokens=6, **params), rec["id"]


# compare and bench add no architecture-specific path to what batch checks on both: one file
@pytest.mark.parametrize("gguf", ["llama"], indirect=True)
def test_compare_rows_equal_the_dequantized_path(gguf, reference):
    code, out, err = cli("compare", "--presets", "greedy,creative", "--variant", "num_beams=2", "--model", gguf,
                         "-n", "5", "--seed", "2", "--raw", "the cat sat")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in rows] == ["greedy", "creative", "num_beams=2"]
    assert rows[0]["text"] == _text(reference, "the cat sat", preset="greedy", max_new_tokens=5, seed=2)
    assert rows[1]["text"] == _text(reference, "the cat sat", preset="creative", max_new_tokens=5, seed=2)
    assert rows[2]["text"] == _text(reference, "the cat sat", max_new_tokens=5, seed=2, num_beams=2)


@pytest.mark.parametrize("gguf", ["llama"], indirect=True)
def test_bench_runs_natively_against_the_dequantized_file(gguf):
    code, out, err = cli("bench", "--model", gguf, "--only", "greedy-b1,greedy-b8,beam4,dola,contrastive",
                         "--rounds", "1", "--new-tokens", "4", "--json")
    assert code == 0, err
    rows = {r["scenario"]: r for r in map(json.loads, out.splitlines())}
    assert set(rows) == {"greedy-b1", "greedy-b8", "beam4", "dola", "contrastive", "llama.cpp greedy-b1"}
    # llama.cpp on the same file beside genkit's greedy-b1, where llama-cpp-python is installed
    llama = rows["llama.cpp greedy-b1"]
    assert llama["tokens_per_s"] is None or (llama["tokens_per_s"] > 0 and llama["genkit_tokens_per_s"] > 0)
    for name in ("greedy-b1", "greedy-b8", "beam4"):
        assert rows[name]["same_tokens"] is True, name  # transformers' generate() on the dequantised file
        assert rows[name]["genkit_tokens_per_s"] > 0 and rows[name]["transformers_tokens_per_s"] > 0
    assert rows["dola"]["step_cost_vs_greedy"] > 0 and rows["contrastive"]["step_cost_vs_greedy"] > 0

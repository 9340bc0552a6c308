"""`genkit score`: each token's log-probability under the model, the total and the perplexity."""

import json
import math

import pytest
import torch

from conftest import run_cli


def test_score_matches_the_models_log_softmax(tiny_dir, tiny, tmp_path):
    text = "The cat sat on the mat."
    ids = tiny.tokenizer(text)["input_ids"]
    with torch.inference_mode():
        logits = tiny.model(input_ids=torch.tensor([ids])).logits[0].float()
    want = [float(torch.log_softmax(logits[i - 1], -1)[ids[i]]) for i in range(1, len(ids))]
    path = tmp_path / "t.txt"
    path.write_text(text)
    for args, stdin in ((["--file", str(path)], None), (["-"], text), ([text], None)):
        r = run_cli("score", "--model", str(tiny_dir), *args, input=stdin)
        assert r.returncode == 0, r.stderr
        rec = json.loads(r.stdout)
        assert [t["id"] for t in rec["tokens"]] == ids
        assert rec["tokens"][0]["logprob"] is None  # no context to predict the first token from
        assert [t["logprob"] for t in rec["tokens"][1:]] == pytest.approx(want, abs=1e-4)
        assert rec["scored_tokens"] == len(ids) - 1
        assert rec["total_logprob"] == pytest.approx(sum(want), abs=1e-3)
        assert rec["perplexity"] == pytest.approx(math.exp(-sum(want) / len(want)), rel=1e-4)
        assert "".join(t["token"] for t in rec["tokens"]) == text


def test_score_bad_input(tiny_dir, genkit_home):
    r = run_cli("score", "--model", str(tiny_dir), "--file", "/nonexistent.txt")
    assert r.returncode == 1 and r.stderr.startswith("genkit: error: /nonexistent.txt: cannot read it")
    r = run_cli("score", "--model", str(tiny_dir), "-", input="   \n")
    assert r.returncode == 1 and "empty" in r.stderr and r.stderr.count("\n") == 1

"""Log-probabilities and alternatives: the processed distribution each token was chosen from."""

from __future__ import annotations

import json
import math

import pytest
import torch

import genkit
from genkit.logprobs import TokenText, from_openai, openai_content, token_records

from conftest import run_cli


def test_greedy_logprobs_are_transformers_processed_scores(tiny):
    """With a repetition penalty the processed scores differ from the raw logits: genkit reports
    the processed ones, exactly as transformers' output_scores holds them."""
    from helpers import encode

    ids, mask = encode(tiny, ["Hello there"])
    with torch.inference_mode():
        out = tiny.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                  repetition_penalty=1.3, output_scores=True, return_dict_in_generate=True,
                                  pad_token_id=2, suppress_tokens=[2])
    ours = genkit.generate(tiny, "Hello there", raw=True, max_new_tokens=6, repetition_penalty=1.3,
                           suppress_tokens=[2], logprobs=3).results[0]
    assert ours.token_ids == out.sequences[0, ids.shape[1]:].tolist()
    for k, step in enumerate(out.scores):
        logp = torch.log_softmax(step[0].float(), dim=-1)
        assert ours.logprobs[k] == pytest.approx(float(logp[ours.token_ids[k]]), abs=1e-4)
        values, top = logp.topk(3)
        assert [i for i, _ in ours.alternatives[k]] == top.tolist()
        assert [v for _, v in ours.alternatives[k]] == pytest.approx(values.tolist(), abs=1e-4)


def test_sampled_logprobs_are_after_the_warpers(tiny):
    r = genkit.generate(tiny, "x", raw=True, max_new_tokens=8, do_sample=True, top_k=5, temperature=0.7,
                        seed=3, logprobs=6, suppress_tokens=[2])
    seq = r.results[0]
    for token, lp, alternatives in zip(seq.token_ids, seq.logprobs, seq.alternatives):
        # top-k 5 leaves exactly five tokens: the listed alternatives are all of them and sum to 1
        assert len(alternatives) == 5
        assert sum(math.exp(v) for _, v in alternatives) == pytest.approx(1.0, abs=1e-4)
        assert dict(alternatives)[token] == pytest.approx(lp)


def test_constrained_alternatives_are_allowed_tokens(tiny):
    seq = genkit.generate(tiny, "x", raw=True, choice=["yes", "no"], logprobs=5).results[0]
    first = [tiny.tokenizer.decode([i]) for i, _ in seq.alternatives[0]]
    assert first and all("yes".startswith(t) or "no".startswith(t) for t in first)
    assert sum(math.exp(v) for _, v in seq.alternatives[0]) == pytest.approx(1.0, abs=1e-4)


def test_token_records_bytes_and_openai_shape(tiny):
    texts = TokenText(tiny.tokenizer)
    # "é" is two bytes; byte-level BPE may split it: the bytes of the tokens rebuild it exactly.
    ids = tiny.tokenizer.encode("café 🙂", add_special_tokens=False)
    recs = token_records(texts, ids, [-0.5] * len(ids), [[(ids[0], -0.1)]] * len(ids))
    assert bytes(b for r in recs for b in r["bytes"]) == "café 🙂".encode()
    assert recs[0]["top_logprobs"][0] == {"token": recs[0]["token"], "id": ids[0], "bytes": recs[0]["bytes"],
                                          "logprob": -0.1}
    content = openai_content(recs)["content"]
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert set(content[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    assert from_openai({"logprobs": True, "top_logprobs": 4}) == 4
    assert from_openai({"logprobs": True}) == 0 and from_openai({}) is None
    with pytest.raises(ValueError, match="top_logprobs 21"):
        from_openai({"logprobs": True, "top_logprobs": 21})


def test_run_json_and_batch_logprobs(tiny_dir, tiny, tmp_path):
    want = genkit.generate(tiny, "Hello", raw=True, max_new_tokens=5, suppress_tokens=[2], logprobs=2).results[0]
    r = run_cli("run", "--model", str(tiny_dir), "--raw", "--json", "-n", "5", "--set", "suppress_tokens=[2]",
                "--logprobs", "2", "Hello")
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)["sequences"][0]["logprobs"]
    assert [x["id"] for x in recs] == want.token_ids
    assert [x["logprob"] for x in recs] == pytest.approx(want.logprobs, abs=1e-5)
    assert [[a["id"] for a in x["top_logprobs"]] for x in recs] == [[i for i, _ in a] for a in want.alternatives]

    # batch: continuous batching gives the same values; OpenAI records ask per record
    src = tmp_path / "in.jsonl"
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    src.write_text(json.dumps({"custom_id": "a", "body": body}) + "\n"
                   + json.dumps({"custom_id": "b", "body": {**body, "logprobs": False, "top_logprobs": None}}) + "\n")
    out = tmp_path / "out.jsonl"
    r = run_cli("batch", str(src), "-o", str(out), "--model", str(tiny_dir), "--raw", "--set", "suppress_tokens=[2]",
                "--output-format", "openai", "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = (json.loads(line)["response"]["body"]["choices"][0] for line in out.read_text().splitlines())
    content = a["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(want.logprobs, abs=1e-4)
    assert len(content[0]["top_logprobs"]) == 2 and b["logprobs"] is None


def _scored(lm, **params):
    return genkit.generate(lm, ["Hello there", "The capital of France is"], raw=True, max_new_tokens=8,
                           suppress_tokens=[2], logprobs=4, **params).results


@pytest.mark.parametrize("params", [{"prompt_lookup_num_tokens": 3}, {"assistant_model": "itself",
                                                                       "num_assistant_tokens": 3}])
def test_drafting_strategies_report_greedys_logprobs(tiny, params):
    """Assisted greedy and prompt lookup choose greedy's tokens from greedy's processed
    distributions, so they report greedy's log-probabilities and alternatives."""
    greedy = _scored(tiny, repetition_penalty=1.3)
    assistant = tiny if "assistant_model" in params else None
    ours = genkit.generate(tiny, ["Hello there", "The capital of France is"], raw=True, max_new_tokens=8,
                           suppress_tokens=[2], logprobs=4, repetition_penalty=1.3, assistant=assistant,
                           **params).results
    for a, b in zip(ours, greedy):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert [[i for i, _ in alt] for alt in a.alternatives] == [[i for i, _ in alt] for alt in b.alternatives]


@pytest.mark.parametrize("params", [
    {"dola_layers": "high", "repetition_penalty": 1.2},
    {"penalty_alpha": 0.6, "top_k": 4},
    {"num_beams": 3, "num_return_sequences": 2},
    {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0},
])
def test_every_strategy_reports_alternatives(tiny, params):
    """Each token's log-probability and its alternatives come from one processed distribution:
    the alternatives are sorted, at most N, and the chosen token's value is at most the best
    one's (DoLa, greedy over its processed scores, takes the best; contrastive search's token is
    among the top_k it was chosen from, so among 4 alternatives)."""
    for r in _scored(tiny, **params):
        assert len(r.logprobs) == len(r.alternatives) == len(r.token_ids) > 0
        for token, lp, alts in zip(r.token_ids, r.logprobs, r.alternatives):
            values = [v for _, v in alts]
            assert 0 < len(alts) <= 4 and values == sorted(values, reverse=True)
            assert lp <= values[0] + 1e-6
            if "dola_layers" in params:
                assert alts[0][0] == token and lp == pytest.approx(values[0], abs=1e-6)
            if "penalty_alpha" in params:
                assert (token, pytest.approx(lp, abs=1e-6)) in alts

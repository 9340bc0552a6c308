"""`genkit bench` runs both engines and reports figures (no timing assertions)."""

import json

from conftest import run_cli


def test_bench_json_reports_both_engines(tiny_dir):
    r = run_cli("bench", "--model", str(tiny_dir), "--only", "greedy-b1,greedy-b8,prompt-lookup,contrastive",
                "--rounds", "1", "--new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["scenario"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == {"greedy-b1", "greedy-b8", "prompt-lookup", "contrastive"}
    for name in ("greedy-b1", "greedy-b8", "prompt-lookup"):
        assert rows[name]["same_tokens"] is True
        assert rows[name]["genkit_tokens_per_s"] > 0 and rows[name]["transformers_tokens_per_s"] > 0
    assert rows["contrastive"]["transformers_tokens_per_s"] is None
    assert rows["contrastive"]["step_cost_vs_greedy"] > 0
    # compared with genkit's greedy on the same prompt, in the same rounds
    assert rows["prompt-lookup"]["speedup_vs_greedy"] > 0 and "step_cost_vs_greedy" not in rows["prompt-lookup"]


def test_bench_rejects_unknown_scenario_before_loading(genkit_home):
    r = run_cli("bench", "--only", "gredy-b1")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (
        "genkit: error: --only gredy-b1: unknown scenario (did you mean 'greedy-b1'?); choose from "
        "greedy-b1, sampling-b1, greedy-b8, beam4, prompt-lookup, assisted, dola, contrastive")


def test_llama_cpp_gets_the_prompt_ids_genkit_prefills(tiny):
    """llama.cpp is fed genkit's exact prompt (chat template and all), not the raw text."""
    from genkit import api
    from genkit import bench as B

    ids = B.prompt_ids(tiny, B.STORY)
    engine_ids, _, _ = api.stream(tiny, [B.STORY], max_new_tokens=2)._encode()
    assert ids == engine_ids[0].tolist()
    assert len(ids) > len(tiny.tokenizer(B.STORY)["input_ids"]) + 5  # the template's system turn is there
    assert B.common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2 and B.common_prefix([5], [5, 6]) == 1


def test_bench_rejects_zero_rounds_and_tokens(genkit_home):
    for flag in ("--rounds", "--new-tokens"):
        r = run_cli("bench", flag, "0")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"Invalid value for '{flag}': 0 is not in the range x>=1." in r.stderr

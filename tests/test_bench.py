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


def test_first_difference_says_whether_the_reference_saw_a_near_tie(tiny):
    """Where genkit's greedy ids part from the reference's, bench names the token and whether the
    reference's logits for the two tokens there were within NEAR_TIE of each other."""
    import torch

    import genkit
    from genkit import bench as B
    from genkit import prompts

    sc = B.Scenario("greedy-b1", ["Name a colour."], {"max_new_tokens": 4})
    theirs = genkit.generate(tiny, sc.prompts[0], max_new_tokens=4, min_new_tokens=4,
                              do_sample=False).results[0].token_ids
    ids, _, _ = prompts.encode(tiny, [prompts.to_text(tiny, sc.prompts[0])], templated=prompts.uses_chat(tiny, False),
                               max_new_tokens=0)
    with torch.inference_mode():
        logits = tiny.model(torch.cat([ids, torch.tensor([theirs[:2]])], 1)).logits[0, -1]
    order = logits.argsort(descending=True).tolist()
    assert order[0] == theirs[2]
    for swapped in (order[1], order[-1]):
        ours = theirs[:2] + [swapped] + theirs[3:]
        note = B.first_difference(tiny, sc, [ours], [theirs])
        gap = float(logits[theirs[2]] - logits[swapped])
        tie = gap <= B.NEAR_TIE * float(logits.abs().max())
        assert note.startswith("parts at token 3: " + ("a near tie" if tie else "not a near tie")), note
    assert "not a near tie" in B.first_difference(tiny, sc, [theirs[:2] + [order[-1]] + theirs[3:]], [theirs])

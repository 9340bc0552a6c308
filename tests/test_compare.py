"""`genkit compare`: one prompt through several presets on one loaded model."""

import json

from conftest import run_cli


def test_compare_json_lines_match_single_runs(tiny_dir):
    args = ["--model", str(tiny_dir), "-n", "5", "--seed", "2", "--raw"]
    r = run_cli("compare", "--presets", "greedy,creative", "--variant", "do_sample=true,temperature=0.5",
                *args, "Once upon a time")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["label"] for x in rows] == ["greedy", "creative", "do_sample=true,temperature=0.5"]
    assert [x["strategy"] for x in rows] == ["greedy", "sampling", "sampling"]
    assert rows[1]["settings"]["temperature"] == 0.8 and rows[2]["settings"]["temperature"] == 0.5
    for row, preset in ((rows[0], "greedy"), (rows[1], "creative")):
        single = run_cli("run", "--json", "--preset", preset, *args, "Once upon a time")
        assert json.loads(single.stdout)["text"] == row["text"]


def test_compare_rejects_unknown_preset_before_loading(genkit_home):
    r = run_cli("compare", "--presets", "greedy,nope", "Hi")
    assert r.returncode == 1 and "unknown preset 'nope'" in r.stderr and r.stdout == ""
    r = run_cli("compare", "Hi")
    assert r.returncode == 1 and "nothing to compare" in r.stderr

"""Watermarked generation (transformers' processor inside genkit's own strategies) and its
detection, from the library and from `genkit detect`."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os

import pytest
import torch

from conftest import run_cli
from helpers import genkit_generate, hf_generate
from genkit import api, watermark
from genkit.models import LoadedModel

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small forwards on a shared 2-core CPU run far faster without torch's thread pool; yields
    the usual thread count for the tests that do real work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield before
    torch.set_num_threads(before)


def draft_of(lm, std=0.004) -> LoadedModel:
    """A noisy copy of `lm`: a draft model that is right some of the time."""
    model = copy.deepcopy(lm.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return LoadedModel(model=model, tokenizer=lm.tokenizer, name="draft", source="test", path="")


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("wm", [
    {"bias": 2.5},
    {"bias": 2.5, "seeding_scheme": "selfhash"},
    {"bias": 1.5, "greenlist_ratio": 0.5, "context_width": 2, "seeding_scheme": "selfhash", "hashing_key": 7},
])
def test_watermark_greedy_matches_transformers(tiny, wm):
    from transformers import WatermarkingConfig

    ours = genkit_generate(tiny, PROMPTS, max_new_tokens=16, watermark=wm)
    theirs = hf_generate(tiny, PROMPTS, max_new_tokens=16, do_sample=False,
                         watermarking_config=WatermarkingConfig(**wm))
    assert ours == theirs
    assert ours != genkit_generate(tiny, PROMPTS, max_new_tokens=16)  # the bias did change the text


@pytest.mark.parametrize("strategy", ["prompt-lookup", "assisted"])
def test_watermark_speculative_greedy_matches_transformers(tiny, strategy):
    """Drafts are verified against the watermarked target scores: the text is greedy's."""
    from transformers import WatermarkingConfig

    wm = {"bias": 2.5}
    extra = ({"prompt_lookup_num_tokens": 3} if strategy == "prompt-lookup"
             else {"assistant": draft_of(tiny), "assistant_model": "draft", "num_assistant_tokens": 3})
    ours = genkit_generate(tiny, PROMPTS, max_new_tokens=16, watermark=wm, **extra)
    theirs = hf_generate(tiny, PROMPTS, max_new_tokens=16, do_sample=False,
                         watermarking_config=WatermarkingConfig(**wm))
    assert ours == theirs


def _strategies(tiny):
    """Every strategy that picks one token at a time, with its parameters."""
    draft = {"assistant": draft_of(tiny), "assistant_model": "draft", "num_assistant_tokens": 3}
    return {
        "greedy": {},
        "sampling": {"do_sample": True, "seed": 1},
        "prompt-lookup": {"prompt_lookup_num_tokens": 3},
        "prompt-lookup-sampling": {"prompt_lookup_num_tokens": 3, "do_sample": True, "seed": 1},
        "assisted": draft,
        "assisted-sampling": {**draft, "do_sample": True, "seed": 1},
        "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
        "dola": {"dola_layers": "high", "repetition_penalty": 1.2},
    }


# strategy -> the module that implements it (some land separately)
MODULES = {
    "greedy": "sampling", "sampling": "sampling", "prompt-lookup": "assisted",
    "prompt-lookup-sampling": "assisted", "assisted": "assisted", "assisted-sampling": "assisted",
    "contrastive": "contrastive", "dola": "dola",
}


@pytest.mark.parametrize("name", list(MODULES))
def test_watermark_in_every_token_strategy(tiny, name):
    if importlib.util.find_spec(f"genkit.engine.strategies.{MODULES[name]}") is None:
        pytest.skip(f"genkit.engine.strategies.{MODULES[name]} is not there yet")
    params = _strategies(tiny)[name]
    wm = {"bias": 4.0}
    detector = watermark.Detector.for_loaded(tiny, watermark.settings(**wm))
    marked = genkit_generate(tiny, PROMPTS, max_new_tokens=30, watermark=wm, **params)
    plain = genkit_generate(tiny, PROMPTS, max_new_tokens=30, **params)
    assert all(detector.score_ids(ids).z_score > 5 for ids in marked)
    assert not any(detector.score_ids(ids).prediction for ids in plain)


def test_run_watermark_flag_and_preset_key(tiny, tiny_dir, tmp_path, capsys):
    """`--watermark` takes transformers' defaults; a preset's `watermark:` sets them."""
    from genkit.cli import main

    expected = api.generate(tiny, ["Hello"], raw=True, max_new_tokens=12, watermark={}).text
    with pytest.raises(SystemExit) as done:
        main(["run", "--model", str(tiny_dir), "--raw", "--greedy", "--watermark", "-n", "12", "Hello"])
    assert done.value.code == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    assert expected != api.generate(tiny, ["Hello"], raw=True, max_new_tokens=12).text

    preset = tmp_path / "marked.yaml"
    preset.write_text("generation:\n  max_new_tokens: 12\n  watermark: {bias: 3.0, seeding_scheme: selfhash}\n")
    from_preset = api.generate(tiny, ["Hello"], raw=True, preset=str(preset)).results[0].token_ids
    direct = genkit_generate(tiny, ["Hello"], max_new_tokens=12, watermark={"bias": 3.0, "seeding_scheme": "selfhash"})
    assert from_preset == direct[0]


# ---------------------------------------------------------------- detection rates


DETECTION_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms, for a child.",
    "Describe your favourite city and why you like it.",
    "Give advice to someone starting to learn the piano.",
    "What are the benefits of regular exercise?",
    "Write a letter to a friend about a recent trip.",
    "Describe how bread is made, step by step.",
    "Why do people keep pets? Discuss.",
]


@pytest.mark.slow
def test_detection_rates_on_the_embedded_model(embedded, one_thread):
    """The issue's bar, at bias 2.5: at least 95% of 40 sampled watermarked texts of 100+ tokens
    are detected, at most 5% of 40 unwatermarked ones are flagged. Texts are scored as text
    (decoded, then tokenized again), as `genkit detect` sees them."""
    wm = {"bias": 2.5}
    # Batches of 40 are compute-bound and want every thread, unless other processes already
    # keep the cores busy: then torch's threads mostly wait for each other (3x slower here).
    busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    torch.set_num_threads(1 if busy else one_thread)
    common = dict(raw=False, do_sample=True, num_return_sequences=5, min_new_tokens=100, max_new_tokens=105)
    try:
        marked = api.generate(embedded, DETECTION_PROMPTS, watermark=wm, seed=11, **common).results
        plain = api.generate(embedded, DETECTION_PROMPTS, seed=12, **common).results
    finally:
        torch.set_num_threads(1)
    assert len(marked) == len(plain) == 40
    assert all(len(r.token_ids) >= 100 for r in marked + plain)
    detector = watermark.Detector.for_loaded(embedded, watermark.settings(**wm))
    detected = sum(detector.score(r.text).prediction for r in marked)
    flagged = sum(detector.score(r.text).prediction for r in plain)
    assert detected >= 38, detected
    assert flagged <= 2, flagged


# ---------------------------------------------------------------- genkit detect


@pytest.fixture(scope="module")
def texts(tiny):
    """Two watermarked and two plain sampled texts of the tiny model (bias 4, lefthash)."""
    marked = api.generate(tiny, PROMPTS, raw=True, do_sample=True, seed=5, max_new_tokens=40,
                          watermark={"bias": 4.0})
    plain = api.generate(tiny, PROMPTS, raw=True, do_sample=True, seed=5, max_new_tokens=40)
    return {"marked": marked.texts, "plain": plain.texts}


def detect_cli(capsys, *args, stdin: str | None = None, monkeypatch=None):
    """Run `genkit detect` in-process as `genkit` runs it: (exit status, stdout, stderr)."""
    from genkit.cli import main

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as done:
        main(["detect", *args])
    out, err = capsys.readouterr()
    return done.value.code, out, err


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_detect_jsonl_in_jsonl_out(tiny_dir, texts, tmp_path, capsys):
    source = jsonl(tmp_path / "in.jsonl", [{"id": "m", "text": texts["marked"][0]}, {"text": texts["plain"][0]}])
    code, out, err = detect_cli(capsys, "--model", str(tiny_dir), source)
    assert code == 0 and err == ""
    first, second = [json.loads(line) for line in out.splitlines()]
    assert first["index"] == 0 and first["id"] == "m" and "id" not in second
    assert first["prediction"] is True and second["prediction"] is False
    for rec in (first, second):
        assert rec["num_tokens_scored"] > 20
        assert rec["green_fraction"] == pytest.approx(rec["num_green_tokens"] / rec["num_tokens_scored"], abs=1e-6)
    assert first["z_score"] > 4 > second["z_score"]
    assert first["p_value"] < 1e-4 < second["p_value"]


def test_detect_agrees_with_the_library(tiny, tiny_dir, texts, tmp_path, capsys):
    source = jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts["marked"] + texts["plain"]])
    _, out, _ = detect_cli(capsys, "--model", str(tiny_dir), "--z-threshold", "4", source)
    ours = [json.loads(line) for line in out.splitlines()]
    library = watermark.detect(texts["marked"] + texts["plain"], tiny, {"bias": 4.0}, z_threshold=4)
    assert [{k: v for k, v in r.items() if k != "index"} for r in ours] == [d.as_dict() for d in library]


def test_detect_exit_code(tiny_dir, texts, tmp_path, capsys):
    marked = jsonl(tmp_path / "marked.jsonl", [{"text": t} for t in texts["marked"]])
    mixed = jsonl(tmp_path / "mixed.jsonl", [{"text": t} for t in texts["marked"] + texts["plain"][:1]])
    assert detect_cli(capsys, "--model", str(tiny_dir), "--exit-code", marked)[0] == 0
    assert detect_cli(capsys, "--model", str(tiny_dir), "--exit-code", mixed)[0] == 1
    assert detect_cli(capsys, "--model", str(tiny_dir), mixed)[0] == 0  # without the flag: success


def test_detect_txt_stdin_and_text_argument(tiny_dir, texts, tmp_path, capsys, monkeypatch):
    lines = "\n".join(t.replace("\n", " ") for t in texts["marked"]) + "\n"
    code, out, _ = detect_cli(capsys, "--model", str(tiny_dir), "--format", "txt", "-", stdin=lines,
                              monkeypatch=monkeypatch)
    assert code == 0 and [json.loads(x)["prediction"] for x in out.splitlines()] == [True, True]
    txt = tmp_path / "texts.txt"
    txt.write_text(lines)
    _, out_file, _ = detect_cli(capsys, "--model", str(tiny_dir), "--format", "txt", str(txt))
    assert out_file == out
    code, out, _ = detect_cli(capsys, "--model", str(tiny_dir), texts["plain"][1])
    record = json.loads(out)
    assert code == 0 and record["index"] == 0 and record["prediction"] is False


def test_detect_reads_plain_input_as_one_text(tiny, tiny_dir, texts, tmp_path, capsys, monkeypatch):
    """What `genkit run --watermark ... > answer.txt` or `| genkit detect` hands over: one text,
    even across lines, scored like the library scores it."""
    text = texts["marked"][0] + "\n\n" + texts["marked"][1]
    expected = watermark.detect([text], tiny, {"bias": 4.0})[0].as_dict()
    for args, stdin in ((["-"], text + "\n"), ([], text + "\n")):
        _, out, _ = detect_cli(capsys, "--model", str(tiny_dir), *args, stdin=stdin, monkeypatch=monkeypatch)
        assert json.loads(out) == {"index": 0, **expected}
    answer = tmp_path / "answer.txt"
    answer.write_text(text + "\n")
    _, out, _ = detect_cli(capsys, "--model", str(tiny_dir), str(answer))
    assert json.loads(out) == {"index": 0, **expected}


def test_detect_with_a_preset(tiny, tiny_dir, tmp_path, capsys):
    preset = tmp_path / "marked.yaml"
    preset.write_text("generation:\n  do_sample: true\n  watermark: {bias: 4.0, seeding_scheme: selfhash}\n")
    text = api.generate(tiny, PROMPTS[:1], raw=True, preset=str(preset), seed=3, max_new_tokens=40).text
    source = jsonl(tmp_path / "in.jsonl", [{"text": text}])
    _, out, _ = detect_cli(capsys, "--model", str(tiny_dir), "--preset", str(preset), source)
    assert json.loads(out)["prediction"] is True
    # other settings draw other green lists: the same text does not look watermarked
    _, out, _ = detect_cli(capsys, "--model", str(tiny_dir), source)
    assert json.loads(out)["prediction"] is False
    no_mark = tmp_path / "plain.yaml"
    no_mark.write_text("generation:\n  do_sample: true\n")
    code, _, err = detect_cli(capsys, "--model", str(tiny_dir), "--preset", str(no_mark), source)
    assert code == 1 and "has no watermark settings" in err


def test_detect_too_short_text(tiny_dir, capsys):
    code, out, _ = detect_cli(capsys, "--model", str(tiny_dir), "--exit-code", "Hi")
    record = json.loads(out)
    assert code == 1 and record["prediction"] is False and "too short" in record["error"]


@pytest.mark.parametrize("content, args, message", [
    ('{"text": "fine"}\n{"text": oops}\n', [], "line 2: not valid JSON"),
    ('{"id": 1, "body": "no text key"}\n', [], 'with a "text" string'),
    ("\n\n", [], "no texts"),
    (None, ["missing.jsonl"], "does not exist"),
    ('{"text": "x y z"}\n', ["--seeding-scheme", "sideways"], "--seeding-scheme sideways"),
    ('{"text": "x y z"}\n', ["--greenlist-ratio", "1.5"], "--greenlist-ratio 1.5"),
    ('{"text": "x y z"}\n', ["--format", "xml"], "--format xml"),
    ('{"text": "x y z"}\n', ["--preset", "no-such-preset"], "unknown preset"),
])
def test_detect_bad_input(tiny_dir, tmp_path, capsys, content, args, message):
    source = []
    if content is not None:
        source = [str(tmp_path / "in.jsonl")]
        (tmp_path / "in.jsonl").write_text(content)
    for flags, status in (([], 1), (["--exit-code"], 2)):
        code, out, err = detect_cli(capsys, "--model", str(tiny_dir), *flags, *args, *source)
        assert code == status and out == ""
        assert err.startswith("genkit: error:") and err.count("\n") == 1 and message in err, err


def test_detect_real_process(tiny_dir, texts, tmp_path):
    """The installed command: JSONL on stdout, exit status from --exit-code, one error line."""
    mixed = jsonl(tmp_path / "mixed.jsonl", [{"text": t} for t in texts["marked"] + texts["plain"]])
    done = run_cli("detect", "--model", str(tiny_dir), "--exit-code", mixed)
    assert done.returncode == 1, done.stderr
    assert [json.loads(x)["prediction"] for x in done.stdout.splitlines()] == [True, True, False, False]
    bad = run_cli("detect", "--model", str(tiny_dir), "--exit-code", "-", input="{broken\n")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr

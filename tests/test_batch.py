"""`genkit batch`: input shapes, error records, OpenAI shapes, ordering, resuming, seeds.

Most tests run the command in-process (Typer's CliRunner around genkit's own `main`, so exit
codes and stderr are what a user sees) on the tiny random model; real subprocesses where a job
must be killed (tests/test_batch_resume.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from genkit import batch as B
from genkit.errors import GenkitError

NO_EOS = ["--set", "suppress_tokens=[2]"]  # random tiny models may stop anywhere otherwise


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are small, and on a CPU shared with other jobs a second
    thread that is rarely scheduled makes every parallel region wait (measured here: 28x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*args, input: str | None = None):
    """`genkit ARGS` in-process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from genkit.cli import main

    code = 0
    with CliRunner().isolation(input=input) as (out, err, _):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()


def records(text_or_path) -> list[dict]:
    text = Path(text_or_path).read_text() if isinstance(text_or_path, Path) else text_or_path
    return [json.loads(line) for line in text.splitlines()]


def stable(recs: list[dict]) -> list[dict]:
    """Records without what changes from run to run (timings, creation time)."""
    out = []
    for r in recs:
        r = json.loads(json.dumps(r))
        r.pop("timings", None)
        if r.get("response"):
            r["response"]["body"].pop("created", None)
        out.append(r)
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- reading the input (no model)


def test_txt_input_skips_blank_lines_and_ids_are_line_numbers(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first\n\n   \nsecond prompt\nthird\n")
    reqs = B.read_requests(str(f))
    assert [(r.line, r.id, r.prompt) for r in reqs] == [(1, 1, "first"), (4, 4, "second prompt"), (5, 5, "third")]
    assert all(r.error is None for r in reqs)


def test_jsonl_bad_records_become_errors_with_their_line(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "ok", "prompt": "hi", "preset": "creative", "vars": {"target": "French"}, "system": "terse",
         "params": {"max_tokens": 5, "temperature": 0.5}},
        "{not json",
        "[1, 2]",
        {"id": "np"},
        {"id": "both", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"id": "typo", "promt": "a"},
        {"id": "neg", "prompt": "a", "params": {"temperature": -1}},
        {"id": 1.5, "prompt": "a"},
        {"messages": [{"role": "user", "content": "chat"}]},
    ])
    reqs = {r.line: r for r in B.read_requests(str(f))}
    ok = reqs[1]
    assert ok.error is None and ok.id == "ok" and ok.preset == "creative" and ok.system == "terse"
    assert ok.params == {"max_new_tokens": 5, "temperature": 0.5} and ok.vars == {"target": "French"}
    assert reqs[2].id == 2 and reqs[2].error.startswith("invalid JSON")
    assert "JSON object" in reqs[3].error
    assert "no prompt" in reqs[4].error and reqs[4].id == "np"
    assert "not both" in reqs[5].error
    assert "unknown key 'promt'" in reqs[6].error and "did you mean 'prompt'" in reqs[6].error
    assert "temperature" in reqs[7].error
    assert reqs[8].id == 8 and "'id' must be" in reqs[8].error  # unusable id: the line number stands in
    assert reqs[9].id == 9 and reqs[9].prompt == [{"role": "user", "content": "chat"}]


def test_openai_request_shape_maps_onto_genkit_parameters(tmp_path):
    def req(custom_id, **body):
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], **body}}

    f = write_jsonl(tmp_path / "openai.jsonl", [
        req("greedy", max_tokens=9, temperature=0),
        req("sampled", temperature=0.7, top_p=0.9, n=2, stop=["\n"], seed=3),
        req("defaults"),
        req("unsupported", frequency_penalty=0.5),
        {"custom_id": "parts", "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                 {"type": "text", "text": "b"}]}]}},
        {"custom_id": "embed", "url": "/v1/embeddings", "body": {"input": "x"}},
    ])
    reqs = {r.id: r for r in B.read_requests(str(f))}
    assert reqs["greedy"].params == {"max_new_tokens": 9, "do_sample": False}
    assert reqs["sampled"].params == {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                      "num_return_sequences": 2, "stop_strings": ["\n"], "seed": 3}
    assert reqs["sampled"].prompt == [{"role": "user", "content": "Say hi"}]
    assert reqs["defaults"].params == {} and reqs["defaults"].error is None
    assert "body.frequency_penalty is not supported" in reqs["unsupported"].error
    assert reqs["parts"].prompt == [{"role": "user", "content": "ab"}]
    assert "/v1/embeddings" in reqs["embed"].error


def test_duplicate_ids_and_unknown_formats_fail_before_any_work(tmp_path):
    f = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    with pytest.raises(GenkitError, match="line 2: id 'x' is already used on line 1"):
        B.read_requests(str(f))
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(GenkitError, match="--format txt or --format jsonl"):
        B.read_requests(str(tmp_path / "p.csv"))
    assert B.read_requests(str(tmp_path / "p.csv"), "txt")[0].prompt == "a"
    with pytest.raises(GenkitError, match="does not exist"):
        B.read_requests(str(tmp_path / "missing.txt"))


def test_stdin_format_is_sniffed(monkeypatch):
    import io

    assert B.read_requests("-", stdin=io.StringIO('\n{"prompt": "a"}\n'))[0].line == 2
    assert B.read_requests("-", stdin=io.StringIO("plain prompt\n"))[0].prompt == "plain prompt"


# ---------------------------------------------------------------- OUTPUT on disk (no model)


def _rec(id_, text="t"):
    return json.dumps({"id": id_, "text": text}) + "\n"


def test_half_written_last_line_is_cut_and_a_missing_newline_restored(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(_rec(1) + _rec(2) + '{"id": 3, "te')
    store = B.OutputStore(out, "genkit")
    assert store.load() == {"1": True, "2": True}
    assert out.read_text() == _rec(1) + _rec(2)  # the half line is gone, the rest untouched
    out.write_text(_rec(1) + _rec(2).rstrip("\n"))
    assert B.OutputStore(out, "genkit").load() == {"1": True, "2": True}
    assert out.read_text() == _rec(1) + _rec(2)


def test_output_of_another_kind_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(_rec(1) + "not json\n" + _rec(2))
    with pytest.raises(GenkitError, match="line 2 is not a genkit batch record.*--overwrite"):
        B.OutputStore(out, "genkit").load()
    out.write_text(_rec(1))
    with pytest.raises(GenkitError, match="genkit format but --output-format is openai"):
        B.OutputStore(out, "openai").load()


def test_finalize_merges_parts_in_input_order_and_the_last_line_wins(tmp_path):
    out = tmp_path / "out.jsonl"
    failed = json.dumps({"id": 2, "error": {"message": "boom", "line": 2}}) + "\n"
    out.write_text(_rec(3) + failed + '{"id": 9')
    (tmp_path / "out.jsonl.part-0-of-2").write_text(_rec(1) + _rec(2, "retried"))
    (tmp_path / "out.jsonl.part-1-of-2").write_text(_rec(4))
    (tmp_path / ".out.jsonl.tmp-123").write_text("left by a rewrite that was killed")
    store = B.OutputStore(out, "genkit")
    assert store.load() == {"3": True, "2": True, "1": True, "4": True}
    assert store.finalize(["1", "2", "3", "4"]) == (4, 0)
    assert out.read_text() == _rec(1) + _rec(2, "retried") + _rec(3) + _rec(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# ---------------------------------------------------------------- the command


@pytest.fixture
def prompts_txt(tmp_path) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("Hello there\n\nThe cat sat on the mat and\nOnce upon a time\nA\n")
    return f


def test_txt_to_stdout_in_input_order(tiny_dir, prompts_txt):
    code, out, err = cli("batch", prompts_txt, "--model", tiny_dir, "-n", "5", "--raw", *NO_EOS)
    assert code == 0, err
    recs = records(out)
    assert [r["id"] for r in recs] == [1, 3, 4, 5]
    first = recs[0]
    assert set(first) == {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "model",
                          "preset", "strategy", "params", "seed", "timings", "fingerprint"}
    assert first["completion_tokens"] == 5 and first["finish_reason"] == "length"
    assert first["prompt_tokens"] == 2 and first["strategy"] == "greedy" and first["preset"] == "default"
    assert first["params"] == {"max_new_tokens": 5, "suppress_tokens": [2]}
    assert set(first["timings"]) == {"elapsed_s", "time_to_first_token_s", "tokens_per_s"}
    assert "genkit batch: 4 done, 0 failed" in err


def test_greedy_records_equal_genkit_run_one_prompt_at_a_time(tiny, tiny_dir, prompts_txt):
    from genkit import api

    code, out, _ = cli("batch", prompts_txt, "--model", tiny_dir, "-n", "6", "--batch-size", "2",
                       "--set", "repetition_penalty=1.3")
    assert code == 0
    for rec, prompt in zip(records(out), ["Hello there", "The cat sat on the mat and", "Once upon a time", "A"]):
        alone = api.generate(tiny, prompt, max_new_tokens=6, repetition_penalty=1.3)
        assert rec["text"] == alone.text
        assert rec["completion_tokens"] == len(alone.results[0].token_ids)


def test_bad_records_become_error_records_and_exit_1(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Hello"},
        "{oops",
        {"id": "c", "prompt": "x", "preset": "no-such-preset"},
        {"id": "d", "prompt": "x", "params": {"top_p": 3}},
        {"id": "e", "prompt": "word " * 400},  # longer than the tiny model's 256 positions
        {"id": "f", "prompt": "x", "params": {"num_return_sequences": 2}},  # n > 1 needs sampling
        {"id": "g", "messages": [{"role": "user", "content": "Hi"}], "system": "Be brief."},
    ])
    out = tmp_path / "out.jsonl"
    code, _, err = cli("batch", src, "-o", out, "--model", tiny_dir, "-n", "3", *NO_EOS)
    assert code == 1
    recs = records(out)
    assert [r["id"] for r in recs] == ["a", 2, "c", "d", "e", "f", "g"]  # one line per input, in order
    errors = {r["id"]: r["error"] for r in recs if "error" in r}
    assert set(errors) == {2, "c", "d", "e", "f"}
    assert errors[2]["line"] == 2 and "invalid JSON" in errors[2]["message"]
    assert errors["c"] == {"message": errors["c"]["message"], "line": 3}
    assert "unknown preset 'no-such-preset'" in errors["c"]["message"]
    assert "top_p" in errors["d"]["message"] and errors["d"]["line"] == 4
    assert "context holds 256" in errors["e"]["message"] and errors["e"]["line"] == 5
    assert "num_return_sequences" in errors["f"]["message"]
    assert "5 failed" in err and "Traceback" not in err


def test_strict_stops_at_the_first_bad_record(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}, {"id": "b", "prompt": "x" * 3000}])
    out = tmp_path / "out.jsonl"
    code, _, err = cli("batch", src, "-o", out, "--model", tiny_dir, "-n", "3", "--strict", *NO_EOS)
    assert code == 1
    assert err.startswith("genkit: error: ") and "line 2 (id 'b')" in err and "--strict" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all("error" not in r for r in records(out))  # strict writes no error records
    # A record that is bad before any model loads stops the job before the model loads.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "Hello"}, "{oops"])
    code, _, err = cli("batch", bad, "--model", tmp_path / "no-model-here", "--strict")
    assert code == 1 and "line 2" in err and "invalid JSON" in err


def test_openai_requests_in_openai_responses_out(tiny_dir, tmp_path):
    def req(custom_id, **body):
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], **body}}

    src = write_jsonl(tmp_path / "batch.jsonl", [
        req("r1", max_tokens=4, temperature=0),
        req("r2", max_tokens=3, temperature=0.8, n=2, seed=5),
        req("r3", max_tokens=4, logit_bias={"1": 2}),
    ])
    out = tmp_path / "out.jsonl"
    code, _, _ = cli("batch", src, "-o", out, "--model", tiny_dir, "--output-format", "openai", *NO_EOS)
    assert code == 1  # r3 asks for something genkit does not do
    r1, r2, r3 = records(out)
    assert r1["custom_id"] == "r1" and r1["error"] is None and r1["id"].startswith("batch_req_")
    body = r1["response"]["body"]
    assert r1["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4
    assert [c["index"] for c in r2["response"]["body"]["choices"]] == [0, 1]
    assert r2["response"]["body"]["usage"]["completion_tokens"] == 6
    assert r3["response"] is None and r3["error"]["line"] == 3 and "logit_bias" in r3["error"]["message"]
    # Resuming an OpenAI-shaped OUTPUT with the other format is refused, not mixed.
    code, _, err = cli("batch", src, "-o", out, "--model", tiny_dir)
    assert code == 1 and "--output-format" in err


def test_stdin_input_and_unordered(tiny_dir):
    code, out, _ = cli("batch", "-", "--model", tiny_dir, "-n", "2", "--raw", *NO_EOS,
                       input='{"id": "x", "prompt": "Hello"}\n{"id": "y", "prompt": "The cat"}\n')
    assert code == 0 and [r["id"] for r in records(out)] == ["x", "y"]
    code, out, _ = cli("batch", "-", "--format", "txt", "--model", tiny_dir, "-n", "2", "--unordered",
                       *NO_EOS, input="one\ntwo\nthree\n")
    assert code == 0 and sorted(r["id"] for r in records(out)) == [1, 2, 3]


def test_resume_skips_done_records_and_replaces_a_half_line(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Story number {i}"} for i in range(6)])
    args = ["--model", tiny_dir, "-n", "6", "--sample", "--seed", "9", *NO_EOS]
    full = tmp_path / "full.jsonl"
    assert cli("batch", src, "-o", full, *args)[0] == 0
    lines = full.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    # A killed job: records 4 and 1 done (in finishing order) and half of record 2.
    part.write_text(lines[4] + lines[1] + lines[2][:30])
    code, _, err = cli("batch", src, "-o", part, *args)
    assert code == 0 and "4 done, 0 failed, 2 skipped" in err
    assert stable(records(part)) == stable(records(full))
    code, _, err = cli("batch", src, "-o", part, *args)  # nothing left: no model is even loaded
    assert code == 0 and "0 done, 0 failed, 6 skipped" in err
    code, _, err = cli("batch", src, "-o", part, "--overwrite", *args)
    assert code == 0 and "6 done" in err
    assert stable(records(part)) == stable(records(full))


def test_output_of_another_job_is_not_mixed_in(tiny_dir, tmp_path, prompts_txt):
    out = tmp_path / "out.jsonl"
    out.write_text(_rec("someone-else"))
    code, _, err = cli("batch", prompts_txt, "-o", out, "--model", tiny_dir, "-n", "2")
    assert code == 1 and "not in the input" in err and "--overwrite" in err
    assert out.read_text() == _rec("someone-else")


def test_seeded_record_same_alone_in_a_batch_of_64_and_after_resume(tiny, tiny_dir, tmp_path):
    from genkit import api

    target = {"id": "t", "prompt": "Tell me about the sea", "params": {"seed": 1234}}
    others = [{"id": i, "prompt": "word " * (i % 13 + 1)} for i in range(63)]
    args = ["--model", tiny_dir, "-n", "8", "--preset", "creative", *NO_EOS]
    alone = tmp_path / "alone.jsonl"
    assert cli("batch", write_jsonl(tmp_path / "a.jsonl", [target]), "-o", alone, *args)[0] == 0
    src = write_jsonl(tmp_path / "b.jsonl", others[:30] + [target] + others[30:])
    many = tmp_path / "many.jsonl"
    assert cli("batch", src, "-o", many, "--batch-size", "64", *args)[0] == 0
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("".join(many.read_text().splitlines(keepends=True)[:20]))
    assert cli("batch", src, "-o", resumed, "--batch-size", "5", *args)[0] == 0
    text = records(alone)[0]["text"]
    assert records(alone)[0]["seed"] == 1234
    assert [r["text"] for r in records(many) if r["id"] == "t"] == [text]
    assert stable(records(resumed)) == stable(records(many))
    # ... and it is what genkit's normal path samples with that seed.
    assert api.generate(tiny, target["prompt"], preset="creative", max_new_tokens=8, seed=1234,
                        suppress_tokens=[2]).text == text


def test_records_without_seed_get_distinct_reproducible_seeds(tiny_dir, prompts_txt):
    args = ("batch", prompts_txt, "--model", tiny_dir, "-n", "4", "--sample", *NO_EOS)
    a = records(cli(*args, "--seed", "1")[1])
    b = records(cli(*args, "--seed", "1", "--batch-size", "1")[1])
    c = records(cli(*args, "--seed", "2")[1])
    assert [r["seed"] for r in a] == [r["seed"] for r in b] and len({r["seed"] for r in a}) == 4
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert [r["seed"] for r in a] != [r["seed"] for r in c]


def test_static_batches_equal_continuous_batching(tiny_dir, prompts_txt):
    args = ("batch", prompts_txt, "--model", tiny_dir, "-n", "7", "--raw", "--set", "no_repeat_ngram_size=2", *NO_EOS)
    cont = records(cli(*args)[1])
    static = records(cli(*args, "--static", "--batch-size", "3", "--max-batch-tokens", "40")[1])
    assert stable(cont) == stable(static) and len(cont) == 4


def test_usage_errors_are_one_line(tiny_dir, tmp_path, prompts_txt):
    for args, expected in [
        (["batch", tmp_path / "nope.txt"], "does not exist"),
        (["batch", prompts_txt, "--output-format", "xml"], "expected genkit or openai"),
        (["batch", prompts_txt, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["batch", prompts_txt, "--set", "temprature=1"], "did you mean 'temperature'"),
        (["batch", prompts_txt, "-o", prompts_txt], "is the input file"),
    ]:
        code, _, err = cli(*args)
        assert code == 1, args
        assert err.startswith("genkit: error: ") and expected in err and len(err.strip().splitlines()) == 1


def test_progress_plain_lines_when_piped_and_nothing_when_quiet(tiny_dir, prompts_txt, monkeypatch):
    monkeypatch.setenv("GENKIT_PROGRESS_INTERVAL", "0")  # a status line at every record
    code, _, err = cli("batch", prompts_txt, "--model", tiny_dir, "-n", "2", "--batch-size", "1", *NO_EOS)
    assert code == 0
    lines = [ln for ln in err.splitlines() if "records (" in ln]
    assert lines and lines[-1].startswith("genkit batch: 4/4 records (0 failed, 0 skipped)")
    assert "tokens/s" in lines[-1] and "ETA" in lines[-1] and "\x1b[" not in err
    code, _, err = cli("batch", prompts_txt, "--model", tiny_dir, "-n", "2", "--quiet", *NO_EOS)
    assert code == 0 and [ln for ln in err.splitlines() if ln.strip()] == [err.strip()]  # the summary alone
    assert err.startswith("genkit batch: 4 done")


def test_progress_bar_in_a_terminal(tiny_dir, prompts_txt, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # Rich treats stderr as a terminal
    code, _, err = cli("batch", prompts_txt, "--model", tiny_dir, "-n", "2", *NO_EOS)
    assert code == 0
    assert "4/4" in err and "tokens/s" in err and "ETA" in err and "genkit batch: 4 done" in err


def _plain_ids(lm, text, **params):
    from genkit import api

    return [r.token_ids for r in api.generate(lm, text, raw=True, **params).results]


@pytest.mark.parametrize("params", [
    {},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 4, "sequence_bias": [[[28], 3.0]]},
    {"do_sample": True, "top_p": 0.9, "temperature": 0.7, "num_return_sequences": 2},
])
def test_continuous_batching_equals_the_plain_path_tiny(tiny, params):
    from genkit import api
    from genkit.engine.continuous import ContinuousBatcher, Job

    texts = ["Hello", "The cat sat on the mat", "A", "Once upon a time in a land far away there",
             "Numbers: 1 2 3 4", "Why?", "The quick brown fox jumps over the lazy dog and the"]
    _, s = api.settings_for(tiny, max_new_tokens=10, **params)
    jobs = [Job(i, tiny.tokenizer(t)["input_ids"], 100 + i, 4 + 2 * (i % 4)) for i, t in enumerate(texts)]
    jobs.sort(key=lambda j: len(j.input_ids))
    # Three rows at a time and a small token budget: rows leave and join at different widths.
    got = {r.handle: [q.token_ids for q in r.sequences]
           for r in ContinuousBatcher(tiny, s, batch_size=3, max_batch_tokens=60).run(jobs)}
    for job in jobs:
        want = _plain_ids(tiny, texts[job.handle], max_new_tokens=job.max_new_tokens, seed=job.seed, **params)
        assert got[job.handle] == want, texts[job.handle]


@pytest.mark.slow
def test_continuous_batching_equals_the_plain_path_embedded(embedded):
    from genkit import api, prompts
    from genkit.engine.continuous import ContinuousBatcher, Job

    questions = ["What is the capital of France?", "Name three colours.",
                 "Write a haiku about the sea and the wind over the harbour at night.", "Hi!",
                 "Explain in one sentence why the sky is blue.", "2+2="]
    _, s = api.settings_for(embedded, max_new_tokens=12)
    jobs = []
    for i, q in enumerate(questions):
        ids = embedded.tokenizer(prompts.to_text(embedded, q), add_special_tokens=False)["input_ids"]
        jobs.append(Job(i, ids, 0, 12))
    got = {r.handle: r.sequences[0].token_ids for r in ContinuousBatcher(embedded, s, batch_size=2).run(jobs)}
    for i, q in enumerate(questions):
        assert got[i] == api.generate(embedded, q, max_new_tokens=12).results[0].token_ids, q


def test_beam_search_and_encoder_decoder_run_in_padded_batches(tiny, tiny_dir, tiny_t5_dir, prompts_txt):
    from genkit import api

    code, out, _ = cli("batch", prompts_txt, "--model", tiny_dir, "-n", "5", "--set", "num_beams=3",
                       "--set", "num_return_sequences=2", *NO_EOS)
    assert code == 0
    recs = records(out)
    assert all(r["strategy"] == "beam" and len(r["text"]) == 2 for r in recs)
    alone = api.generate(tiny, "Once upon a time", max_new_tokens=5, num_beams=3, num_return_sequences=2,
                         suppress_tokens=[2])
    assert recs[2]["text"] == alone.texts
    code, out, _ = cli("batch", prompts_txt, "--model", tiny_t5_dir, "-n", "3")
    assert code == 0 and [r["id"] for r in records(out)] == [1, 3, 4, 5]


def test_pad_gives_what_encode_gives(tiny):
    """A batch job tokenises each prompt once and pads the ids (prompts.pad): the engine must
    see what tokenising the texts together (prompts.encode) gives."""
    from genkit import prompts

    texts = ["Hello", "Once upon a time, in a land far away", "x y"]
    ids, mask, _ = prompts.encode(tiny, texts, templated=False, max_new_tokens=4)
    rows = [tiny.tokenizer(t)["input_ids"] for t in texts]
    padded_ids, padded_mask = prompts.pad(tiny, rows)
    assert padded_ids.tolist() == ids.tolist() and padded_mask.tolist() == mask.tolist()

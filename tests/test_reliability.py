"""Failure probes: what a careless or hostile user does to genkit must lose nothing, replace
nothing that is not genkit's, and cost one clear line (issue 20).

Everything happens inside the test's temporary directory; files are small; a full disk is
simulated (ENOSPC raised by a patched write) rather than made.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from test_batch import NO_EOS, cli, one_thread, records, write_jsonl  # noqa: F401 (autouse fixture)

from genkit import batch as B


def rows(n: int = 3, prefix: str = "Tell me about") -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"{prefix} number {i}"} for i in range(n)]


# ---------------------------------------------------------------- 1. only genkit's output is replaced


@pytest.mark.parametrize("content", [
    b'{"name": "data"}',  # one JSON line without a newline: once cut off as a "half record"
    b'just some notes',
    b'\x89PNG\r\n\x1a\n\x00\x00',  # binary
    b'{"id": 1}\n',  # JSON with an id, but no text and no error: not a batch record
])
def test_a_file_that_is_not_genkits_output_is_never_cut_or_replaced(tmp_path, content):
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    important = tmp_path / "important.json"
    important.write_bytes(content)
    code, _, err = cli("batch", src, "-o", important, "--model", tmp_path / "no-model-needed")
    assert code == 1 and "not a genkit batch record" in err and "--overwrite" in err
    assert err.count("\n") == 1
    assert important.read_bytes() == content


def test_overwrite_does_replace_a_foreign_file(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"name": "data"}')
    code, _, err = cli("batch", src, "-o", out, "--model", tiny_dir, "-n", "2", "--overwrite", *NO_EOS)
    assert code == 0, err
    assert [r["id"] for r in records(out)] == ["r0", "r1"]


# ---------------------------------------------------------------- 2. devices, pipes and links


def test_a_symlink_output_is_written_through_never_replaced(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    real = tmp_path / "data" / "answers.jsonl"
    real.parent.mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    args = ["--model", tiny_dir, "-n", "2", *NO_EOS]
    assert cli("batch", src, "-o", link, *args)[0] == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert [r["id"] for r in records(real)] == ["r0", "r1"]
    code, _, err = cli("batch", src, "-o", link, *args)  # resumes through the link
    assert code == 0 and "2 skipped" in err and link.is_symlink()
    assert sorted(p.name for p in real.parent.iterdir()) == ["answers.jsonl"]


def test_a_device_behind_a_symlink_is_written_as_a_stream(tiny_dir, tmp_path):
    # /dev/null through a link in the test's own directory: if genkit ever replaced it again,
    # it would replace this link, not the system's /dev/null.
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    null = tmp_path / "null"
    null.symlink_to("/dev/null")
    code, out, err = cli("batch", src, "-o", null, "--model", tiny_dir, "-n", "2", *NO_EOS)
    assert code == 0, err
    assert "is not a regular file: records are written to it as a stream" in err
    assert null.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "null"]


def test_a_fifo_output_receives_the_records(tiny_dir, tmp_path):
    import threading

    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    code, _, err = cli("batch", src, "-o", fifo, "--model", tiny_dir, "-n", "2", *NO_EOS)
    reader.join(timeout=60)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [json.loads(line)["id"] for line in got[0].splitlines()] == ["r0", "r1"]


# ---------------------------------------------------------------- 3. resume keeps only matching work


def test_resume_refuses_output_made_from_other_prompts_or_settings(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    out = tmp_path / "out.jsonl"
    args = ["--model", tiny_dir, "-n", "3", "--sample", "--seed", "1", *NO_EOS]
    assert cli("batch", src, "-o", out, *args)[0] == 0
    before = out.read_bytes()
    assert all(len(r["fingerprint"]) == 16 for r in records(out))

    changed_prompts = write_jsonl(tmp_path / "other.jsonl", rows(3, prefix="Write a poem about"))
    for argv in (
        [src, "-o", out, *args, "-n", "4"],  # another length
        [src, "-o", out, *args, "--seed", "2"],  # another seed for sampled records
        [src, "-o", out, *args, "--preset", "precise"],  # another preset
        [changed_prompts, "-o", out, *args],  # same ids, other prompts
        [src, "-o", out, *args, "--system", "Be brief."],
    ):
        code, _, err = cli("batch", *argv)
        assert code == 1, argv
        assert "made from other prompts or settings" in err and "--overwrite" in err, err
        assert out.read_bytes() == before
    code, _, err = cli("batch", src, "-o", out, *args)  # the same job: everything is done
    assert code == 0 and "0 done, 0 failed, 3 skipped" in err
    code, _, err = cli("batch", changed_prompts, "-o", out, *args, "--overwrite")
    assert code == 0 and "3 done" in err


def test_greedy_resume_ignores_the_seed_and_openai_output_carries_the_fingerprint(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    out = tmp_path / "out.jsonl"
    args = ["--model", tiny_dir, "-n", "2", "--output-format", "openai", *NO_EOS]
    assert cli("batch", src, "-o", out, *args)[0] == 0
    assert all(r["response"]["body"]["system_fingerprint"].startswith("genkit-") for r in records(out))
    code, _, err = cli("batch", src, "-o", out, *args, "--seed", "5")  # greedy: the seed changes nothing
    assert code == 0 and "2 skipped" in err
    code, _, err = cli("batch", src, "-o", out, *args, "-n", "3")
    assert code == 1 and "made from other prompts or settings" in err


def test_a_hard_link_to_the_input_is_the_input(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    out = tmp_path / "out.jsonl"
    os.link(src, out)
    code, _, err = cli("batch", src, "-o", out, "--model", tmp_path / "no-model-needed")
    assert code == 1 and "is the input file" in err
    assert out.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------- 4. one job per OUTPUT


def test_a_second_job_on_the_same_output_is_refused_and_names_the_holder(tiny_dir, tmp_path):
    from genkit.batch.lock import OutputLock

    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    out = tmp_path / "out.jsonl"
    args = ["--model", tiny_dir, "-n", "2", *NO_EOS]
    assert cli("batch", src, "-o", out, *args)[0] == 0
    before = out.read_bytes()
    first = OutputLock(out.resolve())  # a job still running on OUTPUT
    first.acquire()
    try:
        code, _, err = cli("batch", src, "-o", out, "--overwrite", *args)
        assert code == 1 and f"being written by another genkit batch (process {os.getpid()}" in err
        assert out.read_bytes() == before
    finally:
        first.release()
    assert cli("batch", src, "-o", out, "--overwrite", *args)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no lock file left


# ---------------------------------------------------------------- 5. the model cache


def _fake_entry(root):
    """A small cache entry: a real safetensors file and a config, with its manifest."""
    import torch
    from safetensors.torch import save_file

    from genkit import models

    entry = root / "cache" / "models" / "tiny-entry"
    entry.mkdir(parents=True)
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(entry / "model.safetensors"))
    (entry / "config.json").write_text('{"model_type": "llama"}')
    models.write_manifest(entry, "test.gguf")
    return entry


def test_a_cache_entry_changed_inside_its_data_is_broken_not_ok(tmp_path, monkeypatch):
    from genkit import models

    monkeypatch.setenv("GENKIT_HOME", str(tmp_path))
    entry = _fake_entry(tmp_path)
    assert models.check_entry(entry) is None
    assert [r["state"] for r in models.cached_entries()] == ["ok"]
    with open(entry / "model.safetensors", "r+b") as fh:  # same size, header intact
        fh.seek(-100, os.SEEK_END)
        fh.write(b"\xff" * 8)
    assert "model.safetensors does not match its hash" in models.check_entry(entry)
    code, out, _ = cli("models", "--json")
    assert code == 0 and "does not match its hash" in json.loads(out)["state"]


def test_models_check_hashes_files_whose_stat_did_not_change(tmp_path, monkeypatch):
    from genkit import models

    monkeypatch.setenv("GENKIT_HOME", str(tmp_path))
    entry = _fake_entry(tmp_path)
    manifest = json.loads((entry / models.MANIFEST).read_text())
    manifest["files"]["config.json"]["sha256"] = "0" * 64  # as if the disk rotted under the same stat
    (entry / models.MANIFEST).write_text(json.dumps(manifest))
    assert models.check_entry(entry) is None  # the cheap check trusts an unchanged stat
    code, out, _ = cli("models", "--json", "--check")
    assert code == 0 and "config.json does not match its hash" in json.loads(out)["state"]


def test_a_killed_conversion_leaves_no_temporary_directory(tmp_path, monkeypatch):
    import subprocess

    from genkit import models

    monkeypatch.setenv("GENKIT_HOME", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    root = tmp_path / "cache" / "models"
    dead = root / f"smollm2-135m-instruct.tmp-{gone.pid}"
    live = root / f"other.tmp-{os.getpid()}"  # a conversion still running
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    assert models.cached_entries() == []
    assert not dead.exists() and live.exists()


# ---------------------------------------------------------------- 6-7. hostile files and names

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(4)
) + "generation: {temperature: *e}\n"  # 100,000 leaves from 200 bytes; each level multiplies by 10


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENKIT_HOME", str(tmp_path / "home"))
    presets_dir = tmp_path / "home" / "config" / "presets"
    presets_dir.mkdir(parents=True)
    return presets_dir


def test_yaml_aliases_are_refused_in_presets_configs_and_set(home, tmp_path):
    (home / "bomb.yaml").write_text(BOMB)
    code, _, err = cli("presets", "show", "bomb")
    assert code == 1 and "aliases (*name) are not allowed" in err and "line 2" in err
    config = tmp_path / "config.yaml"
    config.write_text(BOMB)
    code, _, err = cli("run", "--generation-config", config, "Hi")
    assert code == 1 and "aliases (*name) are not allowed" in err and len(err) < 400
    code, _, err = cli("presets", "show", "greedy", "--set", "temperature=[&a 1, *a]")
    assert code == 1 and "aliases" in err


def test_user_data_in_an_error_line_is_bounded(home):
    big = "[" + ", ".join(["1.5"] * 20000) + "]"
    code, _, err = cli("presets", "show", "greedy", "--set", f"temperature={big}")
    assert code == 1 and "temperature" in err and len(err) < 400 and err.count("\n") == 1


def test_one_bad_preset_file_does_not_break_presets_list(home):
    (home / "latin1.yaml").write_bytes("description: caf\xe9\n".encode("latin-1"))
    (home / "empty-field.yaml").write_text('template: "Say {} please"\n')
    code, out, err = cli("presets", "list", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in map(json.loads, out.splitlines())}
    assert "line 1 is not valid UTF-8 (byte 0xe9)" in rows["latin1"]["description"]
    assert "template field {} is not a plain {name}" in rows["empty-field"]["description"]
    assert rows["greedy"]["strategy"] == "greedy"
    code, _, err = cli("presets", "show", "latin1")
    assert code == 1 and "not valid UTF-8" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["../x.json", "sub/x.json", "/tmp/x.json", ".hidden.json"])
def test_config_save_writes_only_inside_the_directory(home, tmp_path, name):
    target = tmp_path / "model"
    target.mkdir()
    code, _, err = cli("config", "save", target, "--name", name, "--preset", "greedy")
    assert code == 1 and "a plain file name" in err
    assert list(target.iterdir()) == [] and not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------- 8-9. one bad record, one error record


def test_every_kind_of_bad_record_fails_alone_and_the_job_goes_on(tiny_dir, home, tmp_path):
    (home / "braces.yaml").write_text('template: "Say {} please"\n')
    (home / "spec.yaml").write_text('template: "Say {prompt:>99999999999}"\n')
    (home / "conv.yaml").write_text('template: "Say {prompt!x}"\n')
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "ok1", "prompt": "Hello there"}),
        json.dumps({"id": "braces", "prompt": "Hi", "preset": "braces"}),
        json.dumps({"id": "spec", "prompt": "Hi", "preset": "spec"}),
        json.dumps({"id": "conv", "prompt": "Hi", "preset": "conv"}),
        '{"id": "surrogate", "prompt": "A lone \\ud800 here"}',
        json.dumps({"id": "bias", "prompt": "Hi", "params": {"sequence_bias": [[[10 ** 9], 1.0]]}}),
        json.dumps({"id": "pad", "prompt": "Hi", "params": {"pad_token_id": 10 ** 9}}),
        json.dumps({"id": "ok2", "prompt": "The cat sat"}),
    ]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["--model", tiny_dir, "-n", "2", "--raw", *NO_EOS]
    for attempt in range(2):  # a re-run retries the failed records and fails them the same way
        code, _, err = cli("batch", src, "-o", out, *args)
        assert code == 1 and "internal error" not in err, err
        got = {r["id"]: r for r in records(out)}
        assert [r["id"] for r in records(out)] == ["ok1", "braces", "spec", "conv", 5, "bias", "pad", "ok2"]
        assert "text" in got["ok1"] and "text" in got["ok2"]
        assert "template field {} is not a plain {name}" in got["braces"]["error"]["message"]
        assert "template field {prompt:>99999999999}" in got["spec"]["error"]["message"]
        assert "template field {prompt!x}" in got["conv"]["error"]["message"]
        assert "lone surrogate" in got[5]["error"]["message"]
        assert "sequence_bias: token id 1000000000 is outside the vocabulary" in got["bias"]["error"]["message"]
        assert "pad_token_id: token id 1000000000 is outside the vocabulary" in got["pad"]["error"]["message"]
        assert ("2 done, 6 failed" if attempt == 0 else "0 done, 6 failed, 2 skipped") in err


def test_an_engine_failure_on_one_record_fails_only_that_record(tiny_dir, tmp_path, monkeypatch):
    """Whatever breaks inside a batch, the records that run fine alone are written."""
    from genkit.engine import continuous

    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    real_run = continuous.ContinuousBatcher.run

    def run(self, jobs):
        if any(job.handle.req.id == "r2" for job in jobs):
            raise RuntimeError("simulated kernel failure")
        return real_run(self, jobs)

    monkeypatch.setattr(continuous.ContinuousBatcher, "run", run)
    out = tmp_path / "out.jsonl"
    code, _, err = cli("batch", src, "-o", out, "--model", tiny_dir, "-n", "2", *NO_EOS)
    assert code == 1 and "3 done, 1 failed" in err
    got = {r["id"]: r for r in records(out)}
    assert got["r2"]["error"]["message"] == "generation failed: RuntimeError: simulated kernel failure"
    assert all("text" in got[k] for k in ("r0", "r1", "r3"))


def test_a_bom_is_dropped_and_invalid_utf8_fails_only_its_line(tiny_dir, tmp_path):
    bom = b"\xef\xbb\xbf"
    args = ["--model", tiny_dir, "-n", "2", "--raw", *NO_EOS]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(bom + b'{"id": "a", "prompt": "Hello"}\n{"id": "b", "prompt": "caf\xe9"}\n'
                      b'{"id": "c", "prompt": "The cat"}\n')
    code, out, err = cli("batch", jsonl, *args)
    assert code == 1 and "internal error" not in err
    got = records(out)
    assert [r["id"] for r in got] == ["a", 2, "c"] and "text" in got[0] and "text" in got[2]
    assert got[1]["error"] == {"message": "line 2 is not valid UTF-8 (byte 0xe9 at column 27): save the input as UTF-8",
                               "line": 2}
    txt = tmp_path / "in.txt"
    txt.write_bytes(bom + b"Hello\r\nThe cat\r\n")
    code, out, _ = cli("batch", txt, *args)
    _, plain, _ = cli("batch", write_jsonl(tmp_path / "p.jsonl", [{"id": 1, "prompt": "Hello"}]), *args)
    first, alone = records(out)[0], records(plain)[0]
    assert code == 0 and len(records(out)) == 2  # no BOM, no \r inside prompt 1
    assert (first["prompt_tokens"], first["text"]) == (alone["prompt_tokens"], alone["text"])
    code, out, _ = cli("batch", "-", *args, input=(bom + b'{"id": "s", "prompt": "Hello"}\n').decode("utf-8"))
    assert code == 0 and records(out)[0]["id"] == "s"  # stdin with a BOM is still read as JSONL


# ---------------------------------------------------------------- 10-11. one clear line


def genkit_process(*args, stdin=None, input=None, close_stdin=False, timeout=120):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "genkit", *args], input=input, stdin=stdin, capture_output=True, timeout=timeout,
        preexec_fn=(lambda: os.close(0)) if close_stdin else None,
    )


def test_text_that_is_not_utf8_and_a_closed_stdin_are_one_line_before_any_model(tmp_path):
    nowhere = str(tmp_path / "no-model")
    cases = [
        (dict(), ["run", "--model", nowhere, b"caf\xe9"], b"the prompt argument is not valid UTF-8"),
        (dict(input=b"ok\ncaf\xe9\n"), ["run", "--model", nowhere, "-"], b"stdin: line 2 is not valid UTF-8 (byte 0xe9)"),
        (dict(close_stdin=True), ["run", "--model", nowhere, "-"], b"stdin is closed"),
        (dict(close_stdin=True), ["batch", "-", "--model", nowhere], b"stdin is closed"),
        (dict(input=b"caf\xe9\n"), ["detect", "-"], b"stdin: line 1 is not valid UTF-8"),
        (dict(), ["detect", b"caf\xe9"], b"the text argument is not valid UTF-8"),
    ]
    for kwargs, args, expected in cases:
        r = genkit_process(*args, **kwargs)
        assert r.returncode == 1, (args, r.stderr)
        assert expected in r.stderr and r.stderr.count(b"\n") == 1 and b"internal error" not in r.stderr, r.stderr


def test_a_full_disk_in_batch_is_one_line_and_keeps_what_was_written(tiny_dir, tmp_path, monkeypatch):
    import errno

    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    out = tmp_path / "out.jsonl"
    real_write = B.OutputStore.write
    calls = []

    def write(self, record):
        calls.append(record)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.own))
        real_write(self, record)

    monkeypatch.setattr(B.OutputStore, "write", write)
    args = ["--model", tiny_dir, "-n", "2", "--batch-size", "1", *NO_EOS]
    code, _, err = cli("batch", src, "-o", out, *args)
    assert code == 1 and f"{out}: the disk is full" in err and "resumes" in err and err.count("\n") == 1
    assert [r["id"] for r in records(out)] == ["r0"]  # the record written before is kept
    monkeypatch.setattr(B.OutputStore, "write", real_write)
    code, _, err = cli("batch", src, "-o", out, *args)
    assert code == 0 and "2 done, 0 failed, 1 skipped" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_sigterm_stops_a_batch_like_ctrl_c_and_it_resumes(tiny_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    src = write_jsonl(tmp_path / "in.jsonl", rows(40))
    out = tmp_path / "out.jsonl"
    args = ["batch", src, "-o", out, "--model", tiny_dir, "-n", "30", "--batch-size", "1", *NO_EOS]
    proc = subprocess.Popen([sys.executable, "-m", "genkit", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert b"interrupted: run the same command again to resume" in err
    code, _, err = cli(*args)
    assert code == 0 and "skipped" in err
    assert [r["id"] for r in records(out)] == [f"r{i}" for i in range(40)]


def test_stop_takes_escapes_as_the_readme_shows(tiny_dir):
    from genkit.cli.options import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\\n") == "a\tb\\n" and unescape(r"\x") == r"\x"
    code, out, err = cli("run", "--model", tiny_dir, "--raw", "--json", "-n", "2", "--stop", r"\n", "Hi")
    assert code == 0, err
    assert json.loads(out)["settings"]["stop_strings"] == ["\n"]


def test_compare_checks_templates_before_loading_and_takes_var(home, tiny_dir, tmp_path):
    (home / "needs.yaml").write_text('template: "Translate to {target}: {prompt}"\n')
    code, _, err = cli("compare", "--presets", "greedy,needs", "--model", tmp_path / "no-model", "Hello")
    assert code == 1 and "template needs variable 'target': pass --var target=VALUE" in err
    code, out, err = cli("compare", "--presets", "needs", "--var", "target=French", "--model", tiny_dir,
                         "-n", "2", "--raw", "--json", "Hello")
    assert code == 0, err


# ---------------------------------------------------------------- issue 19, defect 1: one seeding rule


def test_unseeded_copies_of_one_prompt_sample_different_texts(tiny):
    import genkit

    common = dict(do_sample=True, max_new_tokens=8, suppress_tokens=[2], top_k=0)
    result = genkit.generate(tiny, ["Tell me a joke."] * 3, **common)
    assert len(set(result.texts)) == 3
    again = genkit.generate(tiny, ["Tell me a joke."] * 3, seed=result.seed, **common)
    assert again.texts == result.texts  # the reported seed reproduces every row
    alone = genkit.generate(tiny, "Tell me a joke.", seed=result.seed, **common)
    assert alone.text == result.texts[0]  # a single prompt samples with the base seed itself


def test_run_and_batch_follow_the_same_rule(tiny, tiny_dir, tmp_path):
    """A batch record with id 0 under --seed S is row 0 of the API under seed S; a record with
    its own seed is `genkit run --seed` with that seed."""
    import genkit
    from genkit.seeding import row_seed

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "prompt": "Once"}, {"id": "x", "prompt": "Once"},
                                               {"id": "y", "prompt": "Once", "params": {"seed": 99}}])
    code, out, err = cli("batch", src, "--model", tiny_dir, "-n", "8", "--sample", "--seed", "5", "--raw",
                         "--set", "top_k=0", *NO_EOS)
    assert code == 0, err
    got = {r["id"]: r for r in records(out)}
    assert [got[0]["seed"], got["x"]["seed"], got["y"]["seed"]] == [5, row_seed(5, "x"), 99]
    common = dict(do_sample=True, max_new_tokens=8, suppress_tokens=[2], top_k=0, raw=True)
    api = genkit.generate(tiny, ["Once", "Once"], seed=5, **common).texts
    assert got[0]["text"] == api[0] and got["x"]["text"] != got[0]["text"]
    code, out, _ = cli("run", "--model", tiny_dir, "--json", "-n", "8", "--sample", "--seed", "99", "--raw",
                       "--set", "top_k=0", *NO_EOS, "Once")
    assert code == 0 and json.loads(out)["text"] == got["y"]["text"]

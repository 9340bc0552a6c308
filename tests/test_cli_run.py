"""`genkit run` as a user meets it: real subprocesses, exact outputs and exit codes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli

NO_EOS = ["--set", "suppress_tokens=[2]"]  # random tiny models may stop anywhere otherwise


def run_json(*args, **kw):
    r = run_cli("run", "--json", *args, **kw)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_json_record_and_max_new_tokens(tiny_dir):
    rec = run_json("--model", str(tiny_dir), "-n", "7", *NO_EOS, "Hello there")
    assert rec["usage"]["completion_tokens"] == 7
    assert rec["finish_reason"] == "length"
    assert rec["strategy"] == "greedy"
    assert rec["settings"]["max_new_tokens"] == 7
    assert set(rec["timings"]) >= {"elapsed_s", "time_to_first_token_s", "tokens_per_s"}


def test_greedy_text_matches_engine(tiny_dir, tiny):
    from helpers import genkit_generate

    rec = run_json("--model", str(tiny_dir), "-n", "6", *NO_EOS, "--raw", "Hello there")
    ids = genkit_generate(tiny, ["Hello there"], raw=True, max_new_tokens=6, suppress_tokens=[2])[0]
    assert rec["text"] == tiny.tokenizer.decode(ids, skip_special_tokens=True)


def test_prompt_from_stdin_and_dash(tiny_dir):
    a = run_json("--model", str(tiny_dir), "-n", "4", *NO_EOS, input="Tell me\n")
    b = run_json("--model", str(tiny_dir), "-n", "4", *NO_EOS, "-", input="Tell me\n")
    c = run_json("--model", str(tiny_dir), "-n", "4", *NO_EOS, "Tell me")
    assert a["prompt"] == b["prompt"] == c["prompt"] == "Tell me"
    assert a["text"] == b["text"] == c["text"]


def test_chat_template_system_and_raw(tiny_dir):
    chat = run_json("--model", str(tiny_dir), "-n", "2", "Hi")
    system = run_json("--model", str(tiny_dir), "-n", "2", "--system", "You are terse and exact.", "Hi")
    raw = run_json("--model", str(tiny_dir), "-n", "2", "--raw", "Hi")
    assert raw["usage"]["prompt_tokens"] == 1  # "Hi" alone, no template
    assert chat["usage"]["prompt_tokens"] > 10  # template with its default system prompt
    assert system["usage"]["prompt_tokens"] != chat["usage"]["prompt_tokens"]


def test_seed_reproducible_and_return_sequences(tiny_dir):
    args = ("--model", str(tiny_dir), "--preset", "creative", "-n", "8", *NO_EOS, "--seed", "11",
            "--num-return-sequences", "2", "Once upon")
    a, b = run_json(*args), run_json(*args)
    assert [s["text"] for s in a["sequences"]] == [s["text"] for s in b["sequences"]]
    assert len(a["sequences"]) == 2 and a["sequences"][0]["text"] != a["sequences"][1]["text"]
    assert a["settings"]["seed"] == 11
    plain = run_cli("run", *args)
    assert plain.returncode == 0
    assert "--- sequence 1/2 ---" in plain.stdout and "--- sequence 2/2 ---" in plain.stdout
    assert "\x1b[" not in plain.stdout  # piped: no ANSI codes


def test_stop_string_is_cut(tiny_dir, tiny):
    full = run_json("--model", str(tiny_dir), "-n", "12", *NO_EOS, "--raw", "abc")["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    rec = run_json("--model", str(tiny_dir), "-n", "12", *NO_EOS, "--raw", "--stop", stop, "abc")
    assert rec["finish_reason"] == "stop"
    assert rec["text"] == full[: full.index(stop)]


def test_stats_line_on_stderr(tiny_dir):
    r = run_cli("run", "--model", str(tiny_dir), "-n", "3", *NO_EOS, "--stats", "Hi")
    assert r.returncode == 0
    assert "3 tokens" in r.stderr and "tokens/s" in r.stderr and "finish: length" in r.stderr


def test_generation_config_save_and_use(tiny_dir, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    for name in ("creative.json", "summary.json"):
        r = run_cli("config", "save", str(d), "--name", name, "--preset",
                    "creative" if name == "creative.json" else "summarize", "--set", "max_new_tokens=5")
        assert r.returncode == 0, r.stderr
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(str(d), "creative.json").temperature == 0.8
    assert GenerationConfig.from_pretrained(str(d), "summary.json").num_beams == 4
    again = run_cli("config", "save", str(d), "--name", "creative.json", "--preset", "creative")
    assert again.returncode == 1 and "--force" in again.stderr
    rec = run_json("--model", str(tiny_dir), "--generation-config", str(d / "creative.json"), *NO_EOS, "--seed", "1", "Hi")
    assert rec["strategy"] == "sampling" and rec["usage"]["completion_tokens"] == 5


def test_dtype_and_device_map(tiny_dir):
    a = run_json("--model", str(tiny_dir), "-n", "3", "--dtype", "bfloat16", "--device-map", "cpu", "Hi")
    assert a["usage"]["completion_tokens"] >= 1


def test_load_in_4bit_on_cpu(tiny_dir):
    pytest.importorskip("bitsandbytes")
    r = run_cli("run", "--json", "--model", str(tiny_dir), "-n", "3", *NO_EOS, "--load-in-4bit", "Hi")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["completion_tokens"] == 3


def test_hub_id_from_local_cache_offline(tiny_dir, tmp_path):
    # A hub id is resolved by transformers: lay the tiny model out as a Hugging Face cache entry.
    snap = tmp_path / "hf" / "hub" / "models--genkit-test--tiny" / "snapshots" / "0123abc"
    shutil.copytree(tiny_dir, snap)
    refs = snap.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123abc")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    rec = run_json("--model", "genkit-test/tiny", "-n", "3", *NO_EOS, "Hi", env=env)
    assert rec["model"] == "genkit-test/tiny" and rec["usage"]["completion_tokens"] == 3
    r = run_cli("run", "--model", "genkit-test/missing", "Hi", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("genkit: error: model 'genkit-test/missing'")


def test_encoder_decoder_run(tiny_t5_dir):
    rec = run_json("--model", str(tiny_t5_dir), "-n", "4", "Translate this")
    assert rec["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("args, stdin, message", [
    (["--model", "/no/such/model", "Hi"], None, "model path /no/such/model does not exist"),
    (["--model", __file__, "Hi"], None, f"{__file__} is a file but not a model"),
    (["--preset", "nope", "Hi"], None, "unknown preset 'nope'"),
    (["--set", "temprature=1", "Hi"], None, "did you mean 'temperature'"),
    (["--set", "top_k", "Hi"], None, "expected key=value"),
    (["--set", "top_k=lots", "Hi"], None, "expected an integer"),
    ([], "", "stdin was empty"),
    (["--num-beams", "4", "--num-beam-groups", "3", "--diversity-penalty", "1", "Hi"], None, "must divide"),
    (["--num-beams", "2", "--num-return-sequences", "3", "Hi"], None, "cannot exceed num_beams"),
    (["--top-p", "1.5", "Hi"], None, "(0, 1]"),
    (["--temperature", "-1", "Hi"], None, "above 0"),
    (["--device-map", "{bad", "Hi"], None, "--device-map"),
])
def test_bad_input_one_line_no_model_load(args, stdin, message, genkit_home):
    r = run_cli("run", *args, input=stdin)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genkit: error:"), r.stderr
    assert message in lines[0]
    assert r.stdout == ""


def test_malformed_preset_yaml(tmp_path, genkit_home):
    f = tmp_path / "broken.yaml"
    f.write_text("generation:\n  temperature: [0.7\n")
    r = run_cli("run", "--preset", str(f), "Hi")
    assert r.returncode == 1 and str(f) in r.stderr and "malformed YAML" in r.stderr


def test_corrupt_gguf(tmp_path, genkit_home):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    r = run_cli("run", "--model", str(bad), "Hi")
    assert r.returncode == 1 and "corrupt GGUF" in r.stderr and "Traceback" not in r.stderr
    notgguf = tmp_path / "other.gguf"
    notgguf.write_text("hello")
    r = run_cli("run", "--model", str(notgguf), "Hi")
    assert r.returncode == 1 and "not a GGUF file" in r.stderr


def test_prompt_longer_than_context(tiny_dir):
    r = run_cli("run", "--model", str(tiny_dir), "--raw", "word " * 400)
    assert r.returncode == 1
    assert "the model's context holds 256" in r.stderr and "Traceback" not in r.stderr


def test_usage_error_exit_2(genkit_home):
    r = run_cli("run", "--no-such-flag", "Hi")
    assert r.returncode == 2 and "No such option" in r.stderr


@pytest.mark.slow
def test_embedded_default_model_end_to_end(embedded_dir):
    rec = run_json("--preset", "greedy", "-n", "30", "What is the capital of France?")
    assert rec["model"] == "SmolLM2-135M-Instruct"
    assert "Paris" in rec["text"] and rec["finish_reason"] == "eos"
    r = run_cli("run", "--preset", "creative", "--seed", "3", "-n", "20", "Write a haiku about the sea.")
    assert r.returncode == 0 and r.stdout.strip()


@pytest.mark.slow
def test_ctrl_c_keeps_text_and_exits_130(embedded_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "genkit", "run", "--preset", "creative", "--seed", "1", "-n", "400",
         "--set", "min_new_tokens=400", "Write a very long story."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        # As a shell's foreground job: a background job (`&` in a script, as CI may run the
        # suite) inherits SIGINT ignored, and Python then keeps ignoring it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = proc.stdout.read(20)  # wait until text is streaming
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(first) == 20 and (first + rest).endswith("\n")  # what was printed stays, its line ended
    assert "finish: cancelled" in err and "Traceback" not in err

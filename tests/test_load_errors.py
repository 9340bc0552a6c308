"""Loading fails early, in one line, and rebuilds a cached model only when its files are damaged."""

import json
import os
import shutil
import time

import pytest

from genkit import models, threads
from genkit.errors import GenkitError
from genkit.models import LoadOptions

from conftest import run_cli


@pytest.mark.parametrize("opts, message", [
    (LoadOptions(native_4bit=True, native_8bit=True), "--native-4bit and --native-8bit exclude each other"),
    (LoadOptions(load_in_4bit=True, load_in_8bit=True), "--load-in-4bit and --load-in-8bit exclude each other"),
    (LoadOptions(int8_activations=True), "--int8-activations applies to genkit.s GGUF kernels"),
    (LoadOptions(native_4bit=True, dtype="float32"), "--native-4bit runs on the CPU"),
    (LoadOptions(native_8bit=True, device_map="auto"), "--native-8bit runs on the CPU"),
    (LoadOptions(dtype="float64"), "--dtype float64: expected auto"),
    (LoadOptions(quant_type="nf8"), "--quant-type nf8"),
    (LoadOptions(device_map="cuda"), "--device-map cuda: this machine has no CUDA GPU"),
    (LoadOptions(device_map='{"": 0}'), "this machine has no CUDA GPU"),
    (LoadOptions(threads=0), "--threads 0"),
    (LoadOptions(backend="statc"), "--backend statc: expected one of auto, transformers"),
])
def test_every_option_is_checked_before_the_gguf_is_converted(opts, message, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("GENKIT_HOME", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(GenkitError, match=message.replace("(", r"\(")):
        models.load(None, opts)
    assert not (tmp_path / "cache" / "models").exists()  # nothing converted, nothing to rebuild
    assert time.monotonic() - started < 5


def test_a_device_mistake_on_the_cli_is_one_line_and_leaves_the_cache_alone(embedded_dir):
    before = {f.name: f.stat().st_mtime_ns for f in embedded_dir.iterdir()}
    r = run_cli("run", "--device-map", "cuda", "Hi")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("genkit: error: --device-map cuda: this machine has no CUDA GPU")
    assert len(r.stderr.strip().splitlines()) == 1
    assert {f.name: f.stat().st_mtime_ns for f in embedded_dir.iterdir()} == before


def test_a_load_error_that_is_not_damage_keeps_the_entry(embedded_dir, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("Torch not compiled with CUDA enabled\nmore detail")

    monkeypatch.setattr(models, "_load_from", fails)
    with pytest.raises(GenkitError) as caught:
        models.load(None)
    assert caught.value.message == (
        "cannot load model 'SmolLM2-135M-Instruct': RuntimeError: Torch not compiled with CUDA enabled")
    assert models.check_entry(embedded_dir) is None


def test_a_load_error_that_means_damage_rebuilds_the_entry_once(embedded_dir, tmp_path, monkeypatch):
    """Damage the manifest cannot see shows as a JSON or safetensors error while loading: the
    entry is rebuilt (here by a stand-in conversion that copies the real one) and loaded."""
    import logging

    from genkit import model_cache

    monkeypatch.setenv("GENKIT_HOME", str(tmp_path))
    entry = models.models_dir() / embedded_dir.name
    shutil.copytree(embedded_dir, entry)
    real_load, calls, conversions, said = models._load_from, [], [], []

    def damaged_once(location, *args):
        calls.append(location)
        if len(calls) == 1:
            raise json.JSONDecodeError("Expecting value", "x", 0)
        return real_load(location, *args)

    def convert(gguf, target, progress=None):
        conversions.append(target)
        shutil.copytree(embedded_dir, target)

    handler = logging.Handler()
    handler.emit = said.append
    logging.getLogger("genkit").addHandler(handler)
    monkeypatch.setattr(models, "_load_from", damaged_once)
    monkeypatch.setattr(model_cache, "convert_gguf", convert)
    try:
        lm = models.load(None)
    finally:
        logging.getLogger("genkit").removeHandler(handler)
    assert lm.name == models.DEFAULT_MODEL and calls == [str(entry), str(entry)] and conversions == [entry]
    assert any("is damaged" in r.getMessage() and "rebuilding it" in r.getMessage() for r in said)


def test_transformers_forward_path_says_nothing_on_stderr(tiny_dir):
    """bfloat16 runs transformers' own forward, whose FutureWarning (and any progress bar)
    must not reach the user: a piped run writes only the answer."""
    r = run_cli("run", "--model", str(tiny_dir), "--dtype", "bfloat16", "-n", "3", "Hi")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_hub_id_in_the_cache_loads_without_the_network(tiny_dir, tmp_path):
    snap = tmp_path / "hf" / "hub" / "models--genkit-test--tiny" / "snapshots" / "0123abc"
    shutil.copytree(tiny_dir, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abc")
    # no HF_HUB_OFFLINE, and a Hub that cannot be reached: a cached model must not care
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = run_cli("run", "--json", "--model", "genkit-test/tiny", "-n", "2", "Hi", env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["model"] == "genkit-test/tiny"
    started = time.monotonic()
    r = run_cli("run", "--model", "genkit-test/missing", "Hi", env=env)
    assert time.monotonic() - started < 60  # no retries: huggingface_hub's took 29 s
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("genkit: error: model 'genkit-test/missing' is not in the local Hugging Face cache")
    assert "127.0.0.1 cannot be reached" in r.stderr
    r = run_cli("run", "--model", "genkit-test/missing", "Hi", env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "HF_HUB_OFFLINE=1 keeps genkit off the network" in r.stderr
    assert "hf download genkit-test/missing" in r.stderr


@pytest.mark.parametrize("flag, env, expected", [
    (3, None, 3), (None, "2", 2), (None, "4,2", 4), (None, None, threads.usable_cores()),
])
def test_thread_count(flag, env, expected, monkeypatch):
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert threads.choose(flag) == expected


def test_bad_omp_num_threads_is_one_line(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    with pytest.raises(GenkitError, match="OMP_NUM_THREADS='lots'"):
        threads.choose(None)


def test_the_cli_sets_threads_and_a_sleeping_wait_policy(tiny_dir):
    """--threads reaches torch, and idle OpenMP workers sleep unless the user chose otherwise."""
    script = ("import os, sys\nfrom genkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
              "    pass\nimport torch\nprint(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], file=sys.stderr)")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    args = ["run", "--model", str(tiny_dir), "-n", "1", "--threads", "1", "Hi"]
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.stderr.strip().splitlines()[-1] == "1 PASSIVE", r.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.stderr.strip().splitlines()[-1] == "1 ACTIVE", r.stderr

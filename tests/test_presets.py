"""Presets: resolution, validation and the preset commands (no model, no torch)."""

import json
import subprocess
import sys

import pytest

from genkit import params as P
from genkit import presets
from genkit.errors import GenkitError

from conftest import run_cli


def test_defaults_match_transformers():
    from transformers import GenerationConfig

    theirs = GenerationConfig._get_default_generation_params()
    for name, p in P.PARAMS.items():
        if name in theirs:
            assert p.default == theirs[name], name


def test_builtin_presets_strategies():
    strategies = {name: presets.load(name).strategy for name in presets.available()}
    assert strategies["creative"] == "sampling"
    assert strategies["greedy"] == "greedy"
    assert strategies["translate"] == "beam"
    assert strategies["summarize"] == "beam"
    assert strategies["factual-dola"] == "dola"
    assert strategies["contrastive"] == "contrastive"
    dola = presets.load("factual-dola").generation
    assert dola["dola_layers"] == "high" and dola["repetition_penalty"] == 1.2
    # every built-in preset says how long to generate
    assert all(presets.load(n).generation.get("max_new_tokens") for n in presets.available())


def test_resolution_order(tmp_path):
    cfg = tmp_path / "gc.json"
    cfg.write_text(json.dumps({"temperature": 0.5, "top_k": 7, "transformers_version": "5.0"}))
    p = presets.resolve("creative", str(cfg), {"top_k": 3})
    assert p.generation["temperature"] == 0.5  # file beats preset
    assert p.generation["top_k"] == 3  # flag beats file
    assert p.generation["top_p"] == 0.95  # preset value kept


def test_extends_chain_and_user_dir(genkit_home):
    udir = genkit_home / "config" / "presets"
    udir.mkdir(parents=True, exist_ok=True)
    (udir / "mine.yaml").write_text("extends: creative\ndescription: mine\ngeneration:\n  temperature: 0.3\n")
    (udir / "loop-a.yaml").write_text("extends: loop-b\n")
    (udir / "loop-b.yaml").write_text("extends: loop-a\n")
    try:
        p = presets.load("mine")
        assert p.generation["temperature"] == 0.3 and p.generation["top_p"] == 0.95
        assert p.description == "mine"
        with pytest.raises(GenkitError, match="cycle"):
            presets.load("loop-a")
    finally:
        for f in ("mine", "loop-a", "loop-b"):
            (udir / f"{f}.yaml").unlink()


@pytest.mark.parametrize("text, message", [
    ("generation:\n  temprature: 1\n", "did you mean 'temperature'"),
    ("temperature: 1\n", "generation parameters go under 'generation:'"),
    ("generation:\n  top_k: many\n", "'top_k': expected an integer"),
    ("generation:\n  num_beams: 4\n  num_beam_groups: 3\n  diversity_penalty: 1.0\n", "must divide num_beams"),
    ("generation:\n  num_beams: 4\n  num_beam_groups: 2\n  diversity_penalty: 1.0\n  do_sample: true\n", "cannot sample"),
    ("generation:\n  num_beams: 2\n  num_return_sequences: 3\n", "cannot exceed num_beams"),
    ("generation:\n  top_p: 0\n", "(0, 1]"),
    ("generation:\n  dola_layers: middle\n", "low, high or a list"),
    ("generation: [1, 2\n", "malformed YAML"),
    ("- just\n- a list\n", "must be a YAML mapping"),
])
def test_bad_preset_files(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(GenkitError) as err:
        presets.load(str(f))
    assert message in str(err.value)
    assert str(f) in str(err.value) or "preset 'bad'" in str(err.value)


def test_parse_set():
    assert presets.parse_set(["num_beams=4", "dola_layers=[28, 30]", "early_stopping=never", "stop=###"]) == {
        "num_beams": 4, "dola_layers": [28, 30], "early_stopping": "never", "stop_strings": ["###"]}
    for bad in ["novalue", "=3", "top_k=", "top_k=abc", "nope=1"]:
        with pytest.raises(GenkitError):
            presets.parse_set([bad])


def test_template_vars():
    p = presets.resolve("translate", vars={"target": "French"})
    assert presets.render_prompt(p, "Hello") == "Translate to French: Hello"
    assert presets.render_prompt(presets.resolve("translate"), "Hallo") == "Translate to English: Hallo"


def test_cli_presets_list_and_show(genkit_home):
    r = run_cli("presets", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {json.loads(l)["name"]: json.loads(l) for l in r.stdout.splitlines()}
    assert rows["factual-dola"]["strategy"] == "dola"
    r = run_cli("presets", "show", "creative", "--json")
    shown = json.loads(r.stdout)["generation"]
    # only what differs from the defaults (top_k 50 is the default and is left out)
    assert shown == {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.05,
                     "max_new_tokens": 256}
    r = run_cli("presets", "show", "nope")
    assert r.returncode == 1 and r.stderr.startswith("genkit: error: unknown preset 'nope'")
    assert "Traceback" not in r.stderr


def test_light_commands_do_not_import_torch(genkit_home):
    code = (
        "import sys\n"
        "from genkit.cli import app\n"
        "for args in (['--help'], ['presets', 'list'], ['presets', 'show', 'creative']):\n"
        "    try:\n"
        "        app(args=args, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, 'pydantic' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # pydantic came with typer 0.29 and cost these commands 60-180 ms (pyproject pins typer below it)
    assert r.stdout.strip().splitlines()[-1] == "False False False", r.stderr


def test_decode_settings_has_a_typed_field_per_parameter():
    """DecodeSettings holds every parameter as its own field with PARAMS' default, so the engine
    reads `settings.top_k` from a declared field and a parameter added to PARAMS needs one."""
    import dataclasses

    from genkit.engine.settings import DecodeSettings

    fields = {f.name: f for f in dataclasses.fields(DecodeSettings)}
    assert set(fields) - set(P.PARAMS) == {"strategy", "eos_ids", "pad_id", "explicit"}
    assert set(P.PARAMS) <= set(fields)
    defaults = DecodeSettings()
    for name, p in P.PARAMS.items():
        expected = P.DEFAULT_MAX_NEW_TOKENS if name == "max_new_tokens" else p.default
        assert getattr(defaults, name) == expected, name
        assert fields[name].type not in ("Any", "object"), name
    assert defaults.params() == {**P.effective({}), "max_new_tokens": P.DEFAULT_MAX_NEW_TOKENS}

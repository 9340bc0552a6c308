"""Shell completion through Typer's own protocol: preset names and cached model names."""

import os
import subprocess
import sys


def complete(words: str, env: dict) -> list[str]:
    full = {**os.environ, **env, "_GENKIT_COMPLETE": "complete_bash", "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split(" ")) - 1)}
    r = subprocess.run([sys.executable, "-m", "genkit"], capture_output=True, text=True, env=full, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_completes_presets_and_models(tmp_path):
    home = tmp_path / "home"
    (home / "config" / "presets").mkdir(parents=True)
    (home / "config" / "presets" / "crisp.yaml").write_text("generation: {temperature: 0.3, do_sample: true}\n")
    (home / "cache" / "models" / "my-model").mkdir(parents=True)
    (home / "cache" / "models" / "x.tmp-123").mkdir(parents=True)  # a conversion in progress: not offered
    hub = tmp_path / "hub"
    (hub / "models--HuggingFaceTB--SmolLM2-360M").mkdir(parents=True)
    (hub / "datasets--some--data").mkdir(parents=True)
    env = {"GENKIT_HOME": str(home), "HF_HUB_CACHE": str(hub)}
    assert complete("genkit run --preset cr", env) == ["creative", "crisp"]
    assert complete("genkit chat -p di", env) == ["diverse"]
    models = complete("genkit chat --model ", env)
    assert models == [str(home / "cache" / "models" / "my-model"), "HuggingFaceTB/SmolLM2-360M"]
    assert complete("genkit run -m Hug", env) == ["HuggingFaceTB/SmolLM2-360M"]


def test_show_completion_script():
    # Typer's own switch for naming the shell instead of detecting it from the parent process
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    r = subprocess.run([sys.executable, "-m", "genkit", "--show-completion", "bash"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0 and "_GENKIT_COMPLETE=complete_bash" in r.stdout

"""What a newcomer meets before any model runs: help, --version, every flag's help and default."""

import importlib.metadata
import subprocess
import sys

import pytest
import typer

from conftest import run_cli

GENERATING = ("run", "chat", "compare", "batch", "bench")


def command(name: str):
    """A command by its words: "run", "presets show"."""
    from genkit.cli import app

    found = typer.main.get_command(app)
    for word in name.split():
        found = found.commands[word]
    return found


def leaf_commands(group=None, prefix=""):
    from genkit.cli import app

    group = group or typer.main.get_command(app)
    for word, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from leaf_commands(cmd, f"{prefix}{word} ")
        else:
            yield f"{prefix}{word}"


@pytest.mark.parametrize("args", [[], ["presets"], ["config"], ["--help"]])
def test_bare_commands_print_help_and_exit_0(args, genkit_home):
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "Usage: genkit" in r.stdout and r.stderr == ""


def test_version_names_genkit_and_its_libraries_without_importing_torch():
    script = ("import sys\nfrom genkit.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
              "    code = e.code\nprint('torch imported:', 'torch' in sys.modules, 'exit', code)")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert lines[0] == f"genkit {importlib.metadata.version('genkit')}"
    for lib in ("torch", "transformers", "tokenizers", "gguf"):
        assert f"{lib} {importlib.metadata.version(lib)}" in lines[1]
    assert lines[-1] == "torch imported: False exit 0"


@pytest.mark.parametrize("name", sorted(leaf_commands()))
def test_every_flag_has_help_and_every_value_flag_its_default(name):
    options = [p for p in command(name).params if p.param_type_name == "option"]
    assert len(options) > 15 or name not in GENERATING
    for param in options:
        if param.param_type_name != "option" or param.name == "help":
            continue
        assert param.help and param.help.strip(), f"{name} {param.opts[0]} has no help"
        assert "\n" not in param.help.strip(), f"{name} {param.opts[0]}: help is not one line"
        if param.is_flag and not param.secondary_opts:
            continue  # a plain switch: off unless given
        shown = param.show_default is True and param.default is not None
        assert shown or "(default: " in param.help, f"{name} {param.opts[0]} does not say its default"


@pytest.mark.parametrize("name", GENERATING)
def test_threads_and_model_flags_on_every_generating_command(name):
    opts = {o for p in command(name).params for o in getattr(p, "opts", [])}
    assert {"--threads", "--model", "--dtype", "--device-map", "--native-4bit", "--native-8bit"} <= opts


def test_defaults_that_apply_are_the_ones_shown(genkit_home):
    help_text = " ".join(p.help or "" for p in command("run").params if p.param_type_name == "option")
    assert "(default: the preset's, else 256)" in help_text
    assert "(default: the preset's, else greedy)" in help_text
    params = run_cli("presets", "params")
    row = next(line for line in params.stdout.splitlines() if line.startswith("max_new_tokens "))
    assert row.split()[1] == "256"
    top = run_cli("--help")
    assert "--debug" in top.stdout and "--version" in top.stdout


def test_compare_without_a_prompt_names_compare(monkeypatch):
    from genkit.cli import options as o
    from genkit.errors import GenkitError

    class Terminal:  # a test's stdin is a pipe; a user's, typing the command, is a terminal
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    with pytest.raises(GenkitError, match=r'genkit compare "\.\.\."'):
        o.prompt_from(None, "compare")


@pytest.mark.parametrize("args, message", [
    (["--preset", "translate", "--var", "targt=French"], "no template variable 'targt' (did you mean 'target'?)"),
    (["--var", "target=French"], "no preset was given"),
    (["--preset", "creative", "--var", "target=French"], "preset 'creative' has no template"),
])
def test_unknown_template_variable_is_an_error(args, message, genkit_home):
    r = run_cli("run", *args, "Good morning")
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genkit: error: --var ") and message in lines[0], r.stderr

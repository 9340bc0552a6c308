"""The README stays executable as written.

Every `genkit` command line in it must parse (a renamed or removed flag fails here), the lines
that need no model run as written, and (slow) the set-up after the install and the first
sections a newcomer follows run as written in a fresh HOME, with the venv's bin on PATH after
`. .venv/bin/activate`, as a new shell would have it. Nothing is installed: the venv the tests
run in stands in for the one the install command makes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
INSTALLS = ("python3 -m venv", "bash scripts/test.sh", ".venv/bin/python -m pytest")
# Run as written by the slow test: the newcomer's path. The later sections' commands (batch jobs,
# watermarks, compare, bench, several processes) take many minutes at the README's lengths on a
# shared 2-core machine; they are parsed here and run by their own tests at small lengths.
STATS_LINE = re.compile(r"\d+ tokens? · [\d.]+ tokens/s · ")
RUN_SECTIONS = ("Set-up on a fresh machine", "genkit run", "Models", "Presets",
                "Several generation configs per model")


def blocks() -> list[tuple[str, str]]:
    """(section heading, text) of every bash block, and of the console block's `$ ` lines."""
    out, heading = [], ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```bash") or line.startswith("```console"):
            end = lines.index("```", i + 1)
            body = lines[i + 1:end]
            if line.startswith("```console"):
                body = [l[2:] for l in body if l.startswith("$ ")]
            out.append((heading, "\n".join(body)))
            i = end
        i += 1
    return out


def command_lines(text: str) -> list[str]:
    """A block's command lines: heredoc bodies belong to the line that opens them, continued
    lines to the line they continue."""
    out, lines = [], text.splitlines()
    while lines:
        line = lines.pop(0)
        while line.endswith("\\") and lines:  # a continued line
            line = line[:-1] + lines.pop(0)
        marker = re.search(r"<<'?(\w+)'?", line)
        if marker:
            body = []
            while lines and lines[0] != marker.group(1):
                body.append(lines.pop(0))
            lines.pop(0)
            line = "\n".join([line, *body, marker.group(1)])
        if line.strip():
            out.append(line)
    return out


def is_install(line: str) -> bool:
    return line.startswith(INSTALLS)


def genkit_invocations(line: str) -> list[list[str]]:
    """The argument lists of every `genkit ...` in a shell line (pipes, &&, $(...), -m genkit)."""
    first = line.split("\n")[0]
    found, outer = [], first
    for start, end in reversed(_substitutions(first)):
        found += genkit_invocations(first[start + 2:end])
        outer = outer[:start] + "SUBST" + outer[end + 1:]
    words = shlex.split(outer, comments=True)
    segment: list[str] = []
    for word in [*words, "|"]:
        if word in ("|", "&&", "||", ";", "&"):
            if "genkit" in segment:
                args = segment[segment.index("genkit") + 1:]
                found.append(_without_redirections(args))
            segment = []
        else:
            segment.append(word)
    return found


def _substitutions(line: str) -> list[tuple[int, int]]:
    """(index of "$(", index of its ")") of each outermost command substitution."""
    spans, depth, start = [], 0, 0
    for i, ch in enumerate(line):
        if line.startswith("$(", i) and depth == 0:
            start, depth = i, 0
        if ch == "(" and (depth or line.startswith("$(", i - 1)):
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if depth == 0:
                spans.append((start, i))
    return spans


def _without_redirections(args: list[str]) -> list[str]:
    out, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in ("<", ">", "2>", ">>"):
            skip = True
        elif not word.startswith(("<", ">", "2>")):
            out.append(word)
    return out


def parse(args: list[str]) -> None:
    """Parse a command line with genkit's CLI as `genkit` would, without running it: a usage
    error (an unknown flag, a bad value) raises."""
    from genkit.cli import app

    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("genkit", list(args))
    while hasattr(cmd, "commands"):
        rest = [*ctx._protected_args, *ctx.args]  # a group keeps its sub-command's words here
        if not rest:
            return
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)


ALL_LINES = [(section, line) for section, text in blocks() for line in command_lines(text)]
INVOCATIONS = [args for _, line in ALL_LINES for args in genkit_invocations(line)]


def test_the_readme_has_the_commands_this_test_expects():
    sections = {section for section, _ in ALL_LINES}
    assert set(RUN_SECTIONS) <= sections
    setup = [line for section, line in ALL_LINES if section == "Set-up on a fresh machine" and not is_install(line)]
    assert setup[0] == ". .venv/bin/activate" and "genkit pull" in setup
    assert len(INVOCATIONS) > 40


# Typer's completion options act while they are parsed (one writes the user's shell start-up
# file): they are checked to exist, not parsed.
ACTING_OPTIONS = ("--install-completion", "--show-completion")


@pytest.mark.parametrize("args", INVOCATIONS, ids=[" ".join(a)[:60] for a in INVOCATIONS])
def test_every_genkit_command_line_in_the_readme_parses(args):
    from genkit.cli import app

    if args and args[0] in ACTING_OPTIONS:
        assert args[0] in {o for p in typer.main.get_command(app).params for o in p.opts}
        return
    parse(args)


@pytest.fixture
def fresh_shell(tmp_path, genkit_home):
    """A working directory whose .venv is the tests' venv, a fresh HOME, a PATH without the venv
    (the README's activate line puts it there). genkit's kernel build is copied from the
    session's cache: building it is test_kernels' business and takes 1-2 minutes."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    kernels = genkit_home / "cache" / "kernels"
    if kernels.is_dir():
        shutil.copytree(kernels, home / ".cache" / "genkit" / "kernels")
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    return work, env


def run_script(lines: list[str], work: Path, env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run lines in one new shell (a block's lines share its variables, e.g. MODEL=...), after
    the README's activation line; the first failing command is named on stderr."""
    script = "\n".join([". .venv/bin/activate", "set -eo pipefail",
                        "trap 'echo \"README line failed: $BASH_COMMAND\" >&2' ERR", *lines, ""])
    return subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_lines_without_a_model_run_as_written(fresh_shell):
    work, env = fresh_shell
    quick = [line for _, line in ALL_LINES
             if re.match(r"(mkdir|cat >|printf|genkit )", line)
             and all(args[:1] in (["presets"], ["models"], ["--version"]) for args in genkit_invocations(line))]
    assert len(quick) >= 6
    for line in quick:
        r = run_script([line], work, env)
        assert r.returncode == 0, f"{line}\n{r.stderr}"
        assert r.stderr == "", f"{line}\n{r.stderr}"


@pytest.mark.slow
def test_readme_setup_and_first_sections_run_as_written_in_a_fresh_home(fresh_shell):
    work, env = fresh_shell
    for section, text in blocks():
        if section not in RUN_SECTIONS:
            continue
        lines = [line for line in command_lines(text) if not is_install(line)]
        if not lines:
            continue  # the install command: the tests' venv stands in for it
        r = run_script(lines, work, env)
        assert r.returncode == 0, f"{section}: exit {r.returncode}\n{r.stderr}"
        # piped, stderr holds genkit's own lines only (first-run steps, --stats), never a library's
        own = [l for l in r.stderr.splitlines() if l.startswith("genkit: ") or STATS_LINE.match(l)]
        assert own == r.stderr.splitlines(), f"{section}\n{r.stderr}"
        if section == "Set-up on a fresh machine" and "genkit pull" in lines:
            assert "converting SmolLM2-135M-Instruct.Q4_1.gguf into genkit's cache (once" in r.stderr
            assert r.stdout.strip(), "the first run printed no answer"
    assert (work.parent / "home" / ".cache" / "genkit" / "models").is_dir()

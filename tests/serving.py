"""A real `genkit serve` for the tests: a subprocess on a free port of 127.0.0.1, the tiny
random Llama with a 4096-token context, and `genkit.generate` to compare its answers with.

Test modules import the fixtures they use (`from serving import server, lm, ...`); each module
then starts its own server.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

KEY = "sk-genkit-test"
NO_EOS = {"suppress_tokens": [2]}  # random tiny models may stop anywhere otherwise
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory, embedded_dir) -> Path:
    """The tiny random Llama with a 4096-token context: long answers for disconnect tests."""
    from conftest import _save_tiny, tiny_llama_config

    return _save_tiny(tmp_path_factory.mktemp("tiny-long"), tiny_llama_config(max_position_embeddings=4096),
                      embedded_dir)


@pytest.fixture(scope="module")
def lm(long_dir):
    from genkit import models

    return models.load(str(long_dir))


class Server:
    def __init__(self, model_dir: Path, *args: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GENKIT_API_KEY": KEY}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genkit", "serve", "--model", str(model_dir), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.err_lines: list[str] = []
        line = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.err_lines.append(line)
            if " on http://" in line:
                break
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, f"the server did not start: {''.join(self.err_lines)}"
        self.url = match.group(0)
        self.root = self.url[:-len("/v1")]
        self.stopping = False

    def terminate(self) -> None:
        self.stopping = True
        self.proc.send_signal(signal.SIGTERM)

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None and not self.stopping:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, "".join(self.err_lines) + err


@pytest.fixture(scope="module")
def server(long_dir):
    srv = Server(long_dir)
    yield srv
    code, err = srv.stop(signal.SIGINT)  # Ctrl-C
    assert code == 0, err
    assert "Traceback" not in err and err.rstrip().endswith("genkit serve: stopped")


def expected(lm, prompt, **kw):
    import genkit

    return genkit.generate(lm, prompt, **kw)

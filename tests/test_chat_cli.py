"""`genkit chat` as a user meets it: piped (one message per line, one answer per line) and in a
real terminal driven through tmux."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import run_cli, tiny_llama_config, _save_tiny

NO_EOS = ["--set", "suppress_tokens=[2]"]


def expected_answers(lm_dir, messages, **params):
    """The answers a library ChatSession gives, in the order the pipe gets them."""
    from genkit import models
    from genkit.chat import ChatSession

    session = ChatSession(models.load(str(lm_dir)), overrides=params)
    out = []
    for m in messages:
        for _ in session.ask(m):
            pass
        out.append(session.messages[-1]["content"])
    return out


def escaped(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def test_piped_one_answer_per_line(tiny_dir):
    messages = ["Hello there", "What next?", "Tell me a story"]
    r = run_cli("chat", "--model", str(tiny_dir), "-n", "12", *NO_EOS, input="\n".join(messages) + "\n")
    assert r.returncode == 0, r.stderr
    want = expected_answers(tiny_dir, messages, max_new_tokens=12, suppress_tokens=[2])
    assert r.stdout == "".join(escaped(a) + "\n" for a in want)
    assert r.stderr == ""
    # the first answer is what `genkit run` answers to the same message
    first = json.loads(run_cli("run", "--json", "--model", str(tiny_dir), "-n", "12", *NO_EOS, messages[0]).stdout)
    assert escaped(first["text"]) == r.stdout.splitlines()[0]


def test_piped_slash_commands_and_bad_input(tiny_dir, tmp_path):
    saved = tmp_path / "conv.json"
    lines = [
        "Hello there",
        "/set max_new_tokens 3",
        "/set top_p 7",  # bad value: one line, the chat goes on
        "/frobnicate",  # unknown command
        f"/load {tmp_path / 'missing.json'}",  # unreadable file
        "Again",
        "/retry",
        f"/save {saved}",
        "/undo",
        "/exit",
        "never read",
    ]
    r = run_cli("chat", "--model", str(tiny_dir), "-n", "6", *NO_EOS, input="\n".join(lines) + "\n")
    assert r.returncode == 1  # some lines failed; all the others were carried out
    out = r.stdout.splitlines()
    assert len(out) == 3  # Hello there, Again, and the retry
    assert out[1] == out[2]  # greedy: /retry gives the same answer
    errors = r.stderr.splitlines()
    assert errors[0] == "max_new_tokens = 3"
    assert errors[1] == "genkit: error: line 3: /set top_p: bad value 7 for 'top_p': expected a number in (0, 1]"
    assert errors[2] == "genkit: error: line 4: unknown command /frobnicate: /help lists the commands"
    assert errors[3].startswith(f"genkit: error: line 5: cannot read {tmp_path / 'missing.json'}")
    assert errors[4].startswith("saved 4 messages to ")
    assert errors[5] == "forgot 2 messages"
    assert len(errors) == 6 and "Traceback" not in r.stderr
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert data["settings"] == {"max_new_tokens": 3}
    want = expected_answers(tiny_dir, ["Hello there"], max_new_tokens=6, suppress_tokens=[2])
    assert out[0] == escaped(want[0])
    assert len(r.stdout) < 400


def test_piped_load_continues_a_saved_chat(tiny_dir, tmp_path):
    first = run_cli("chat", "--model", str(tiny_dir), "-n", "5", *NO_EOS,
                    input=f"Hello there\n/save {tmp_path / 'c.json'}\n")
    assert first.returncode == 0, first.stderr
    cont = run_cli("chat", "--model", str(tiny_dir), "-n", "5", *NO_EOS,
                   input=f"/load {tmp_path / 'c.json'}\nWhat next?\n")
    whole = run_cli("chat", "--model", str(tiny_dir), "-n", "5", *NO_EOS, input="Hello there\nWhat next?\n")
    assert cont.stdout.splitlines() == whole.stdout.splitlines()[1:]


def test_chat_refuses_bad_flags_before_loading(tiny_dir):
    r = run_cli("chat", "--model", str(tiny_dir), "--num-return-sequences", "2", "--sample", input="Hi\n")
    assert r.returncode == 1
    assert r.stderr.strip() == "genkit: error: a chat answers with one sequence: num_return_sequences must be 1"
    r = run_cli("chat", "--model", str(tiny_dir), "--set", "temprature=1", input="Hi\n")
    assert r.returncode == 1 and "did you mean 'temperature'" in r.stderr and len(r.stderr.splitlines()) == 1


# ---------------------------------------------------------------- a real terminal (tmux)

TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(
    TMUX is None, reason="TMUX MISSING: install tmux (scripts/test.sh does) to test the interactive chat")


class Terminal:
    """A tmux session running one command; keys in, screen text out."""

    def __init__(self, command: str, env: dict, width: int = 120, height: int = 40):
        self.name = f"genkit-test-{uuid.uuid4().hex[:8]}"
        self.socket = self.name  # one tmux server per terminal: closing one never touches another
        env_args = [f"{k}={v}" for k, v in env.items()]
        self._tmux("new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                   "env", *env_args, "bash", "-c", command + "; echo EXITED=$?; sleep 60")

    def _tmux(self, *args) -> str:
        return subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    def keys(self, *keys) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", self.name, "-l", text)
        self.keys("Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", self.name)

    def wait_for(self, predicate, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out; the screen shows:\n{self.screen()}")

    def prompts(self, text: str) -> int:
        return sum(1 for line in text.splitlines() if line.startswith(">>>"))

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def slow_tiny_dir(tmp_path_factory, embedded_dir) -> Path:
    """A tiny model with a long context, so an answer of thousands of tokens can be stopped."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-long"), tiny_llama_config(max_position_embeddings=65536),
                      embedded_dir)


def chat_command(*args) -> str:
    return " ".join([sys.executable, "-m", "genkit", "chat", *args])


@needs_tmux
def test_interactive_chat_in_a_terminal(tiny_dir, slow_tiny_dir, genkit_home, tmp_path):
    home = tmp_path / "home"
    env = {"GENKIT_HOME": str(home), "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "TERM": "xterm-256color"}
    (home / "cache").mkdir(parents=True)
    # the kernels build is shared with the test session's home, so the terminal starts at once
    kernels = Path(genkit_home) / "cache" / "kernels"
    if kernels.is_dir():
        os.symlink(kernels, home / "cache" / "kernels")
    want = expected_answers(tiny_dir, ["Hello there", "line one\nline two"], max_new_tokens=8, suppress_tokens=[2])
    term = Terminal(chat_command("--model", str(tiny_dir), "-n", "8", "--set", "'suppress_tokens=[2]'"), env)
    try:
        term.wait_for(lambda s: s.count(">>>") == 1)
        term.type("Hello there")
        screen = term.wait_for(lambda s: term.prompts(s) == 2)
        assert want[0].split("\n")[0] in screen
        term.type('"""')
        term.type("line one")
        term.type('line two"""')
        screen = term.wait_for(lambda s: term.prompts(s) == 3)
        assert "... line one" in screen and want[1].split("\n")[0] in screen
        term.type("/bogus")
        screen = term.wait_for(lambda s: term.prompts(s) == 4)
        assert "genkit: error: unknown command /bogus: /help lists the commands" in screen
        term.keys("Up", "Up")  # readline history: the multi-line message's last line
        term.keys("C-u")
        term.type("/stats")
        screen = term.wait_for(lambda s: "conversation: 2 answers" in s)
        assert "from the cache" in screen
        term.keys("C-d")
        term.wait_for(lambda s: "EXITED=0" in s)
    finally:
        term.close()
    history = (home / "config" / "chat_history").read_text()
    assert "Hello there" in history and "/stats" in history

    # Ctrl-C stops an answer and the chat goes on
    term = Terminal(chat_command("--model", str(slow_tiny_dir), "-n", "60000", "--set", "'suppress_tokens=[2]'"), env)
    try:
        term.wait_for(lambda s: s.count(">>>") == 1)
        term.type("Go on forever")
        time.sleep(3)
        term.keys("C-c")
        screen = term.wait_for(lambda s: "(stopped)" in s and term.prompts(s) == 2)
        term.type("/set max_new_tokens 3")
        term.wait_for(lambda s: "max_new_tokens = 3" in s)
        term.type("Short now")
        term.type("/stats")
        screen = term.wait_for(lambda s: "3 tokens" in s and "finish: length" in s)
        term.keys("C-d")
        term.wait_for(lambda s: "EXITED=0" in s)
    finally:
        term.close()


def test_piped_message_too_long_is_dropped(tiny_dir):
    long = "word " * 400  # the tiny model's context holds 256 positions
    r = run_cli("chat", "--model", str(tiny_dir), "-n", "4", *NO_EOS, input=f"{long}\nHello there\n/undo\n/undo\n")
    assert r.returncode == 1
    errors = r.stderr.splitlines()
    assert errors[0].startswith("genkit: error: line 1: the prompt is ") and "shorten the prompt" in errors[0]
    # the long message left the conversation: one exchange to undo, then nothing
    assert errors[1:] == ["forgot 2 messages", "genkit: error: line 4: nothing to undo: the conversation is empty"]
    assert len(r.stdout.splitlines()) == 1

"""The SQLite log: every run and chat turn recorded, continued with -c / --cid, listed and shown by
`genkit logs`, and never a reason for a run to fail."""

import json
import sqlite3
import subprocess
import sys

from conftest import run_cli

NO_EOS = ["--set", "suppress_tokens=[2]"]


def home_env(tmp_path, genkit_home):
    """A GENKIT_HOME of its own (an empty log) that shares the test session's cache."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "cache").symlink_to(genkit_home / "cache")
    return {"GENKIT_HOME": str(home)}, home


def logs_json(env, *args):
    r = run_cli("logs", *args, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_run_logged_and_continued(tiny_dir, tiny, tmp_path, genkit_home):
    from genkit.engine import Generation
    from genkit.engine.settings import build

    env, home = home_env(tmp_path, genkit_home)
    first = json.loads(run_cli("run", "--json", "--model", str(tiny_dir), "-n", "5", *NO_EOS, "--seed", "3",
                               "Hello there", env=env).stdout)
    follow = run_cli("run", "--json", "-c", "--model", str(tiny_dir), "-n", "5", *NO_EOS, "What next?", env=env)
    assert follow.returncode == 0, follow.stderr
    follow = json.loads(follow.stdout)
    # the follow-up saw the whole conversation: the same tokens as a generation on it from scratch
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first["text"]},
               {"role": "user", "content": "What next?"}]
    settings = build(tiny, {"max_new_tokens": 5, "suppress_tokens": [2]})
    assert follow["text"] == Generation(tiny, [history], settings).run()[0].text
    assert follow["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 5

    [conv] = logs_json(env, "list")
    assert conv["turns"] == 2 and conv["first_prompt"] == "Hello there" and conv["model"] == tiny_dir.name
    rows = logs_json(env, "show", conv["id"][:6])
    assert [r["prompt"] for r in rows] == ["Hello there", "What next?"]
    assert [r["answer"] for r in rows] == [first["text"], follow["text"]]
    assert rows[0]["seed"] == 3 and rows[0]["settings"] == {"max_new_tokens": 5, "suppress_tokens": [2], "seed": 3}
    assert rows[0]["completion_tokens"] == first["usage"]["completion_tokens"] == 5
    assert rows[1]["prompt_tokens"] == follow["usage"]["prompt_tokens"]
    assert rows[0]["command"] == "run" and rows[0]["finish_reason"] == "length"
    assert set(rows[0]["timings"]) >= {"elapsed_s", "time_to_first_token_s", "tokens_per_s"}
    shown = run_cli("logs", "show", conv["id"], env=env)
    assert shown.returncode == 0 and "> What next?" in shown.stdout and follow["text"] in shown.stdout


def test_chat_logged_and_continued(tiny_dir, tmp_path, genkit_home):
    env, home = home_env(tmp_path, genkit_home)
    args = ("chat", "--model", str(tiny_dir), "-n", "5", *NO_EOS)
    whole = run_cli(*args, input="Hello there\n/retry\nWhat next?\nGo on\n", env={**env, "GENKIT_LOG": "0"})
    part = run_cli(*args, input="Hello there\n/retry\nWhat next?\n", env=env)
    rest = run_cli(*args, "-c", input="Go on\n", env=env)
    assert rest.returncode == 0, rest.stderr
    assert part.stdout.splitlines() + rest.stdout.splitlines() == whole.stdout.splitlines()
    [conv] = logs_json(env, "list")  # GENKIT_LOG=0 logged nothing
    rows = logs_json(env, "show", conv["id"])
    assert [r["prompt"] for r in rows] == ["Hello there", "Hello there", "What next?", "Go on"]
    assert [r["command"] for r in rows] == ["chat"] * 4
    assert rows[2]["history"] == [{"role": "user", "content": "Hello there"},
                                  {"role": "assistant", "content": rows[1]["answer"]}]
    assert rows[2]["timings"]["reused_prompt_tokens"] > 0
    by_cid = run_cli(*args, "--cid", conv["id"], "--no-log", input="Go on\n", env=env)
    assert by_cid.stdout == rest.stdout
    assert logs_json(env, "list")[0]["turns"] == 4  # --no-log wrote nothing


def test_logs_off_no_log_and_unwritable_log(tiny_dir, tmp_path, genkit_home):
    env, home = home_env(tmp_path, genkit_home)
    assert run_cli("logs", "off", env=env).stdout == "logging is off\n"
    run_cli("run", "--model", str(tiny_dir), "-n", "2", "Hi", env=env)
    assert not (home / "data" / "logs.db").exists()
    assert run_cli("logs", "on", env=env).stdout == "logging is on\n"
    r = run_cli("run", "-c", "--model", str(tiny_dir), "-n", "2", "Hi", env=env)
    assert r.returncode == 1
    assert r.stderr == "genkit: error: there is no logged conversation to continue yet: start one without -c\n"
    # a data directory that cannot be created: the answer comes, with one warning line
    (home / "data").write_text("not a directory")
    r = run_cli("run", "--json", "--model", str(tiny_dir), "-n", "3", *NO_EOS, "Hi", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["usage"]["completion_tokens"] == 3
    [warning] = r.stderr.splitlines()
    assert warning.startswith("genkit: warning: could not write the log ")
    r = run_cli("chat", "--model", str(tiny_dir), "-n", "3", *NO_EOS, input="Hi\nAgain\n", env=env)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2 and len(r.stderr.splitlines()) == 1
    # a damaged log file: the same
    (home / "data").unlink()
    (home / "data").mkdir()
    (home / "data" / "logs.db").write_bytes(b"this is not sqlite" * 100)
    r = run_cli("run", "--json", "--model", str(tiny_dir), "-n", "3", *NO_EOS, "Hi", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["usage"]["completion_tokens"] == 3
    assert len(r.stderr.splitlines()) == 1
    r = run_cli("logs", "list", env=env)
    assert r.returncode == 1 and r.stderr.startswith("genkit: error: cannot read the log ")


def test_logs_commands_import_no_torch(tmp_path, genkit_home):
    env, home = home_env(tmp_path, genkit_home)
    code = ("import sys\nfrom genkit.cli import main\n"
            "for args in (['logs', 'list'], ['logs', 'path']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__("os").environ, **env},
                       timeout=60)
    assert r.stdout.splitlines() == ["no conversations logged yet", str(home / "data" / "logs.db"), "False False"]
    r = run_cli("logs", "show", "nope", env=env)
    assert r.returncode == 1
    assert r.stderr == "genkit: error: genkit logs show nope: is not a logged conversation; `genkit logs list` shows the ids\n"


def test_log_of_an_earlier_schema_gains_new_columns(tmp_path, monkeypatch):
    from genkit import logs

    monkeypatch.setenv("GENKIT_HOME", str(tmp_path))
    logs.db_path().parent.mkdir(parents=True)
    with sqlite3.connect(logs.db_path()) as db:  # the first schema had no history column
        db.execute("CREATE TABLE responses (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,"
                   " created REAL NOT NULL, command TEXT NOT NULL, model TEXT, preset TEXT, system TEXT,"
                   " prompt TEXT NOT NULL, answer TEXT NOT NULL, settings TEXT, seed INTEGER, finish_reason TEXT,"
                   " prompt_tokens INTEGER, completion_tokens INTEGER, timings TEXT)")
        db.execute("INSERT INTO responses (conversation_id, created, command, prompt, answer) VALUES"
                   " ('old', 1.0, 'run', 'Hi', 'Hello')")
    assert logs.record("new", command="chat", model="m", preset=None, system=None, history=[{"role": "user",
                       "content": "x"}], prompt="p", answer="a", settings={}, seed=1, finish_reason="eos",
                       prompt_tokens=3, completion_tokens=1, timings={}) == 2
    assert logs.messages_of(logs.turns("old")) == [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello"}]
    assert logs.turns("new")[0]["history"] == [{"role": "user", "content": "x"}]

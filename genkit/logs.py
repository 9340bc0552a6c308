"""The SQLite log of every `genkit run` and every chat turn, in genkit's data directory.

One row per answer (prompt, answer, model, settings, seed, token counts, timings), grouped by
conversation: a `genkit run` is a conversation of one turn, a chat one of many, and both can be
continued (`genkit chat -c`, `genkit run -c`). Logging never breaks a generation: a log that
cannot be written (a read-only data directory, a locked or damaged file) costs one warning line
on stderr, once per process, and the answer is printed as usual.

Pure Python (sqlite3, json): `genkit logs` never imports torch.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path

from genkit import paths
from genkit.errors import GenkitError

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL,
    created REAL NOT NULL,
    command TEXT NOT NULL,
    model TEXT,
    preset TEXT,
    system TEXT,
    history TEXT,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    settings TEXT,
    seed INTEGER,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    timings TEXT
);
CREATE INDEX IF NOT EXISTS responses_conversation ON responses (conversation_id, id);
"""

_warned = False


def db_path() -> Path:
    return paths.data_dir() / "logs.db"


def off_marker() -> Path:
    return paths.config_dir() / "logs-off"


def enabled() -> bool:
    """Logging is on unless GENKIT_LOG=0 or `genkit logs off` said so."""
    if os.environ.get("GENKIT_LOG", "").strip() == "0":
        return False
    return not off_marker().exists()


def set_enabled(on: bool) -> None:
    marker = off_marker()
    try:
        if on:
            marker.unlink(missing_ok=True)
        else:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("genkit does not log runs and chats while this file exists\n")
    except OSError as e:
        raise GenkitError(f"cannot change {marker}: {e.strerror}") from None


def new_conversation_id() -> str:
    """Sortable by time (milliseconds in hex), unique by its random tail."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)}"


def _connect(create: bool) -> sqlite3.Connection:
    path = db_path()
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise FileNotFoundError(path)
    db = sqlite3.connect(path, timeout=5)
    db.row_factory = sqlite3.Row
    if create:
        db.executescript(SCHEMA)
        _add_missing_columns(db)
    return db


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """A log written by an earlier genkit gains the columns added since (left empty there)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(responses)")}
    for line in SCHEMA.split("CREATE TABLE IF NOT EXISTS responses (")[1].split(");")[0].splitlines():
        column = line.strip().rstrip(",")
        name = column.split(" ")[0]
        if name and name not in have and "NOT NULL" not in column and "PRIMARY" not in column:
            db.execute(f"ALTER TABLE responses ADD COLUMN {column}")


def warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"genkit: warning: {message}", file=sys.stderr, flush=True)


def record(conversation_id: str, *, command: str, model: str, preset: str | None, system: str | None,
           history: list[dict], prompt: str, answer: str, settings: dict, seed: int | None, finish_reason: str | None,
           prompt_tokens: int, completion_tokens: int, timings: dict) -> int | None:
    """Write one answer; its row id, or None when the log could not be written (warned once)."""
    try:
        with closing(_connect(create=True)) as db, db:
            cur = db.execute(
                "INSERT INTO responses (conversation_id, created, command, model, preset, system, history, prompt,"
                " answer, settings, seed, finish_reason, prompt_tokens, completion_tokens, timings)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, time.time(), command, model, preset, system,
                 json.dumps(history, ensure_ascii=False), prompt, answer,
                 json.dumps(settings, ensure_ascii=False, default=str), seed, finish_reason, prompt_tokens,
                 completion_tokens, json.dumps(timings)),
            )
            return cur.lastrowid
    except (sqlite3.Error, OSError) as e:
        warn_once(f"could not write the log {db_path()} ({e}); the answer is not logged "
                  "(--no-log or `genkit logs off` stops trying)")
        return None


def _rows(sql: str, args=()) -> list[dict]:
    try:
        with closing(_connect(create=False)) as db:
            return [dict(r) for r in db.execute(sql, args)]
    except FileNotFoundError:
        return []
    except sqlite3.Error as e:
        raise GenkitError(f"cannot read the log {db_path()}: {e}") from None


def conversations(limit: int = 20) -> list[dict]:
    """The latest conversations first: id, last time, model, turns, first prompt."""
    return _rows(
        "SELECT conversation_id AS id, MAX(created) AS updated, MIN(created) AS started, COUNT(*) AS turns,"
        " (SELECT model FROM responses r2 WHERE r2.conversation_id = r.conversation_id ORDER BY id DESC LIMIT 1)"
        " AS model,"
        " (SELECT prompt FROM responses r3 WHERE r3.conversation_id = r.conversation_id ORDER BY id LIMIT 1)"
        " AS first_prompt,"
        " MAX(id) AS last_id"
        " FROM responses r GROUP BY conversation_id ORDER BY last_id DESC LIMIT ?",
        (limit,),
    )


def turns(conversation_id: str) -> list[dict]:
    rows = _rows("SELECT * FROM responses WHERE conversation_id = ? ORDER BY id", (conversation_id,))
    for row in rows:
        row["settings"] = json.loads(row["settings"] or "{}")
        row["timings"] = json.loads(row["timings"] or "{}")
        row["history"] = json.loads(row["history"] or "[]")
    return rows


def latest_conversation_id() -> str | None:
    rows = _rows("SELECT conversation_id FROM responses ORDER BY id DESC LIMIT 1")
    return rows[0]["conversation_id"] if rows else None


def find_conversation(conversation_id: str | None, where: str = "--cid") -> tuple[str, list[dict]]:
    """The conversation to continue: the given id (a unique prefix will do) or the latest."""
    if conversation_id is None:
        cid = latest_conversation_id()
        if cid is None:
            raise GenkitError("there is no logged conversation to continue yet: start one without -c")
    else:
        matches = _rows("SELECT DISTINCT conversation_id FROM responses WHERE conversation_id LIKE ? LIMIT 2",
                        (conversation_id.replace("%", "").replace("_", "") + "%",))
        if len(matches) != 1:
            what = "matches several conversations" if matches else "is not a logged conversation"
            raise GenkitError(f"{where} {conversation_id}: {what}; `genkit logs list` shows the ids")
        cid = matches[0]["conversation_id"]
    return cid, turns(cid)


def messages_of(rows: list[dict]) -> list[dict]:
    """A logged conversation as chat messages, ready to continue: the messages its last answer
    followed (each row keeps them, so /undo, /retry and /load are told right), then that answer."""
    if not rows:
        return []
    last = rows[-1]
    return [*last["history"], {"role": "user", "content": last["prompt"]},
            {"role": "assistant", "content": last["answer"]}]


def record_generation(conversation_id: str, command: str, gen, *, model: str, preset: str | None,
                      system: str | None, history: list[dict], prompt: str, settings: dict,
                      extra_timings: dict | None = None):
    """Log a finished (or stopped) generation of the engine: its first sequence's answer."""
    results = gen.results
    return record(
        conversation_id, command=command, model=model, preset=preset, system=system, history=history, prompt=prompt,
        answer=results[0].text if results else "", settings=settings, seed=gen.seed,
        finish_reason=results[0].finish_reason if results else "cancelled",
        prompt_tokens=gen.stats.prompt_tokens, completion_tokens=gen.stats.completion_tokens,
        timings={**gen.stats.as_dict(), **(extra_timings or {})},
    )

"""INPUT: a .txt or .jsonl file (or stdin) read into checked `Request`s."""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path
from typing import TextIO

from genkit import params as P
from genkit.batch.openai import request_from_openai
from genkit.batch.requests import Request, check_id, opt_str, prompt_of, vars_of
from genkit.errors import GenkitError, did_you_mean

RECORD_KEYS = {"id", "prompt", "messages", "preset", "vars", "system", "params", "metadata"}
FORMATS = ("txt", "jsonl")


def input_format(path: str, fmt: str | None, first_line: str = "") -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise GenkitError(f"--format {fmt}: expected txt or jsonl")
        return fmt
    if path == "-":
        return "jsonl" if first_line.lstrip().startswith("{") else "txt"
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return "txt"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise GenkitError(f"cannot tell the format of {path} from its extension: pass --format txt or --format jsonl")


def read_requests(path: str, fmt: str | None = None, stdin: TextIO | None = None) -> list[Request]:
    """Every record of INPUT (a file, or '-' for stdin), blank lines skipped. A line that is not
    valid UTF-8 becomes that record's error; a UTF-8 byte order mark is dropped."""
    lines = read_lines(path, stdin)
    first = next((ln for ln in lines if ln.strip()), b"").decode("utf-8", "replace")
    fmt = input_format(path, fmt, first)
    requests = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            requests.append(Request(number, number, error=(
                f"line {number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}): "
                "save the input as UTF-8")))
            continue
        requests.append(Request(number, number, prompt=text) if fmt == "txt" else parse_jsonl(number, text))
    if not requests:
        where = "stdin" if path == "-" else path
        raise GenkitError(f"{where} holds no prompts: one prompt per line (.txt) or one JSON record per line (.jsonl)")
    check_unique_ids(requests, path)
    return requests


def read_lines(path: str, stdin: TextIO | None = None) -> list[bytes]:
    """INPUT's lines as bytes (split on \\n only: a prompt may hold U+2028 or a form feed),
    without a leading byte order mark or the \\r of Windows line ends."""
    if path == "-":
        data = _read_stdin(stdin)
    else:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise GenkitError(f"input file {path} does not exist; pass a .txt or .jsonl file, or - for stdin") from None
        except OSError as e:
            raise GenkitError(f"cannot read input file {path}: {e.strerror}") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    return [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")]


def _read_stdin(stdin: TextIO | None) -> bytes:
    stream = stdin or sys.stdin
    if stream is None or stream.closed:
        raise GenkitError("stdin is closed: pipe the prompts in, or pass the input file instead of -")
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        return buffer.read()
    return stream.read().encode("utf-8", "surrogateescape")


def _is_text(obj) -> bool:
    """Whether every string in a parsed record is valid Unicode (JSON's \\u escapes can
    name half of a surrogate pair, which no tokenizer or UTF-8 file can hold)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unique_ids(requests: list[Request], path: str) -> None:
    # Ids key resuming and the output: two records with one id would overwrite each other.
    seen: dict[str, int] = {}
    for r in requests:
        if r.key in seen:
            raise GenkitError(
                f"{path}: line {r.line}: id {r.id!r} is already used on line {seen[r.key]}; ids must be unique"
            )
        seen[r.key] = r.line


def parse_jsonl(line: int, text: str) -> Request:
    """A JSONL record (genkit's keys or the OpenAI batch request shape) as a Request."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Request(line, line, error=f"invalid JSON: {e.msg} at column {e.colno}")
    if not _is_text(obj):
        return Request(line, line, error="the record holds a lone surrogate escape (like \\ud800), which is not "
                                         "text: fix the string's \\u escapes")
    if not isinstance(obj, dict):
        return Request(line, line, error="a record must be a JSON object, e.g. {\"prompt\": \"...\"}")
    if "custom_id" in obj and "body" in obj:
        return request_from_openai(line, obj)
    req = Request(line, obj.get("id", line))
    try:
        check_id(req.id)
        unknown = [k for k in obj if k not in RECORD_KEYS]
        if unknown:
            raise ValueError(f"unknown key '{unknown[0]}'{did_you_mean(unknown[0], RECORD_KEYS)}")
        req.prompt = prompt_of(obj.get("prompt"), obj.get("messages"))
        req.preset = opt_str(obj, "preset")
        req.system = opt_str(obj, "system")
        req.vars = vars_of(obj.get("vars"))
        req.params = P.check_params(obj.get("params") or {}, "params")
        req.metadata = obj.get("metadata")
    except (ValueError, GenkitError) as e:
        req.error = str(e)
        if not isinstance(req.id, (str, int)) or isinstance(req.id, bool):
            req.id = line
    return req


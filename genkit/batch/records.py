"""Output records: a finished or failed request as a genkit or OpenAI JSON line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from genkit.batch.openai import openai_error, openai_result
from genkit.batch.requests import Request, record_key

OUTPUT_FORMATS = ("genkit", "openai")


def format_result(req: Request, fmt: str, *, texts: list[str], finish: list[str], prompt_tokens: int,
                  completion_tokens: int, model: str, strategy: str, params: dict, seed: int,
                  timings: dict, complete: list | None = None, logprobs: list | None = None) -> dict:
    if fmt == "openai":
        return openai_result(req, texts, finish, prompt_tokens, completion_tokens, model, logprobs)
    many = len(texts) > 1
    record = {
        "id": req.id,
        "text": texts if many else texts[0],
        "finish_reason": finish if many else finish[0],
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "model": model,
        "preset": req.resolved.name,
        "strategy": strategy,
        "params": params,
        "seed": seed,
        "timings": timings,
        "fingerprint": req.fingerprint,
    }
    if complete and complete[0] is not None:  # constrained output: was the grammar satisfied
        incomplete = [not c for c in complete]
        record["incomplete"] = incomplete if many else incomplete[0]
    if logprobs is not None:  # per sequence, per token: genkit.logprobs.token_records
        record["logprobs"] = logprobs if many else logprobs[0]
    if req.metadata is not None:
        record["metadata"] = req.metadata
    return record


def format_error(req: Request, fmt: str, message: str) -> dict:
    if fmt == "openai":
        return openai_error(req, message)
    record = {"id": req.id, "error": {"message": message, "line": req.line}}
    if req.metadata is not None:
        record["metadata"] = req.metadata
    return record


def dumps(record: dict) -> str:
    """One line of JSON. A string that is not valid Unicode (a lone surrogate from a record's
    own JSON escapes) cannot be written as UTF-8: such a line falls back to ASCII escapes,
    which read back to the same string."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record)
    return text


@dataclass
class Identity:
    key: str
    fmt: str  # genkit or openai
    ok: bool  # a result, not an error record
    fingerprint: str | None  # what the result was made from (records.fingerprint_of)


def identity(record: Any) -> Identity | None:
    """Who an output record is, or None if it is not one of genkit's batch records."""
    if not isinstance(record, dict):
        return None
    if "custom_id" in record and "response" in record and "error" in record:
        ok = record.get("error") is None
        body = (record.get("response") or {}).get("body") if ok else None
        system = body.get("system_fingerprint") if isinstance(body, dict) else None
        fp = system[len("genkit-"):] if isinstance(system, str) and system.startswith("genkit-") else None
        return Identity(record_key(record["custom_id"]), "openai", ok, fp)
    if "id" in record and ("text" in record or "error" in record):
        fp = record.get("fingerprint")
        return Identity(record_key(record["id"]), "genkit", "error" not in record, fp if isinstance(fp, str) else None)
    return None


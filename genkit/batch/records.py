"""Output records: a finished or failed request as a genkit or OpenAI JSON line."""

from __future__ import annotations

import json
from typing import Any

from genkit.batch.openai import openai_error, openai_result
from genkit.batch.requests import Request, record_key

OUTPUT_FORMATS = ("genkit", "openai")


def format_result(req: Request, fmt: str, *, texts: list[str], finish: list[str], prompt_tokens: int,
                  completion_tokens: int, model: str, strategy: str, params: dict, seed: int,
                  timings: dict) -> dict:
    if fmt == "openai":
        return openai_result(req, texts, finish, prompt_tokens, completion_tokens, model)
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
    }
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
    return json.dumps(record, ensure_ascii=False)


def identity(record: Any) -> tuple[str, str, bool] | None:
    """(key, format, ok) of an output record, or None if it is not one of genkit's."""
    if not isinstance(record, dict):
        return None
    if "custom_id" in record and "response" in record:
        return record_key(record["custom_id"]), "openai", record.get("error") is None
    if "id" in record:
        return record_key(record["id"]), "genkit", "error" not in record
    return None


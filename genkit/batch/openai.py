"""The OpenAI batch shapes: request lines in genkit's terms, response lines out."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from genkit import params as P
from genkit.batch.requests import Request, check_id, messages_of, prompt_of
from genkit.errors import GenkitError

# OpenAI batch request bodies: keys genkit maps onto its parameters, and keys that change
# nothing about the text (accepted so that existing files run unchanged).
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")
OPENAI_IGNORED = {"model", "user", "metadata", "stream", "store", "service_tier"}
OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "time": "length", "cancelled": "length"}


def request_from_openai(line: int, obj: dict) -> Request:
    """An OpenAI batch request line: custom_id, url, body with messages and sampling options."""
    req = Request(line, obj["custom_id"])
    try:
        check_id(req.id)
        url = obj.get("url")
        if url is not None and url not in OPENAI_URLS:
            raise ValueError(f"url {url!r} is not supported; genkit runs {' and '.join(OPENAI_URLS)}")
        body = obj["body"]
        if not isinstance(body, dict):
            raise ValueError("'body' must be a JSON object")
        if "messages" in body:
            req.prompt = messages_of(body["messages"])
        else:
            req.prompt = prompt_of(body.get("prompt"), None)
        req.params = P.check_params(openai_params(body), "body")
        from genkit.logprobs import from_openai

        req.logprobs = from_openai(body)
    except (ValueError, GenkitError) as e:
        req.error = str(e)
        if not isinstance(req.id, (str, int)) or isinstance(req.id, bool):
            req.id = line
    return req


def openai_params(body: dict) -> dict:
    """OpenAI's options in genkit's terms. A temperature of 0 means greedy decoding, above 0
    sampling; without temperature, top_p or n the job's preset decides."""
    known = {"messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
             "response_format", "logprobs", "top_logprobs"}
    for key in body:
        if key not in known and key not in OPENAI_IGNORED:
            raise ValueError(f"body.{key} is not supported by genkit; remove it or set it in 'params' of a genkit record")
    out: dict[str, Any] = {}
    for src in ("max_tokens", "max_completion_tokens"):
        if body.get(src) is not None:
            out["max_new_tokens"] = body[src]
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
            raise ValueError(f"body.temperature {temperature!r}: expected a number of at least 0")
        out["do_sample"] = temperature > 0
        if temperature > 0:
            out["temperature"] = temperature
    sampling = temperature is None or temperature > 0
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
        if sampling and body["top_p"] != 1:
            out["do_sample"] = True
    if body.get("n") is not None:
        out["num_return_sequences"] = body["n"]
        if sampling and body["n"] != 1:
            out["do_sample"] = True
    if body.get("stop") is not None:
        out["stop_strings"] = body["stop"]
    if body.get("seed") is not None:
        out["seed"] = body["seed"]
    if body.get("response_format") is not None:
        from genkit import constraints

        out.update(constraints.from_response_format(body["response_format"], "body"))
    return out


def openai_id(prefix: str, key: str) -> str:
    # Stable ids: a resumed job writes the same ids an uninterrupted one does.
    return f"{prefix}_{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def openai_result(req, texts, finish, prompt_tokens, completion_tokens, model, logprobs=None) -> dict:
    from genkit.logprobs import openai_content

    chat = isinstance(req.prompt, list)
    choices = [
        {"index": i, **({"message": {"role": "assistant", "content": t}} if chat else {"text": t}),
         "logprobs": openai_content(logprobs[i]) if logprobs else None, "finish_reason": OPENAI_FINISH.get(f, "stop")}
        for i, (t, f) in enumerate(zip(texts, finish))
    ]
    body = {
        "id": openai_id("chatcmpl" if chat else "cmpl", req.key),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": f"genkit-{req.fingerprint}",  # what resuming compares
    }
    return {
        "id": openai_id("batch_req", req.key), "custom_id": req.id,
        "response": {"status_code": 200, "request_id": openai_id("req", req.key), "body": body},
        "error": None,
    }


def openai_error(req: Request, message: str) -> dict:
    return {
        "id": openai_id("batch_req", req.key), "custom_id": req.id, "response": None,
        "error": {"code": "invalid_request", "message": message, "line": req.line},
    }

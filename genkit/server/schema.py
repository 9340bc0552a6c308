"""OpenAI's request bodies in genkit's terms, and OpenAI's error shape.

A body is parsed by pydantic (types), then mapped: the fields OpenAI batch files share with
the API go through genkit.batch's mapping (one place decides what temperature 0 or n mean);
the API's other fields are mapped or refused with one message each; every field OpenAI does
not define must be a genkit generation parameter (num_beams, dola_layers, penalty_alpha...),
checked like a preset's key.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from genkit import params as P
from genkit.batch.openai import openai_params
from genkit.batch.requests import messages_of
from genkit.errors import GenkitError, did_you_mean
from genkit.logprobs import MAX_TOP, from_openai

# Fields of the batch files' body that the API shares (genkit.batch maps them).
SHARED = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed", "response_format")
# Genkit parameters a request may not set: they would load another model per request.
NOT_PER_REQUEST = {"assistant_model"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Optional[bool] = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    # Accepted and ignored: they change nothing about the text.
    user: Optional[str] = None
    metadata: Optional[dict] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None


class ChatRequest(_Common):
    messages: list[Any]
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Any = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list] = None
    function_call: Any = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


def parse(raw: bytes, kind: type[_Common]) -> _Common:
    """The body as a request, or a 400 that names the field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"'{field}': {err['msg']}", param=field) from None


def _refuse(field: str, why: str) -> APIError:
    return APIError(400, f"'{field}' is not supported by genkit serve: {why}", param=field,
                    code="unsupported_parameter")


def _refuse_unsupported(req: _Common) -> None:
    for field in ("frequency_penalty", "presence_penalty"):
        if getattr(req, field):
            raise _refuse(field, "use the extra field 'repetition_penalty' (a factor, 1.0 = none; "
                                 "e.g. 1.2) or 'no_repeat_ngram_size'")
    if isinstance(req, ChatRequest):
        for field in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(req, field):
                raise _refuse(field, "genkit runs no tools or functions")
    else:
        if req.echo:
            raise _refuse("echo", "the prompt is not repeated in the answer")
        if req.suffix:
            raise _refuse("suffix", "genkit does not fill in the middle")
        if req.best_of not in (None, 1) and req.best_of != req.n:
            raise _refuse("best_of", "use n, or num_beams through an extra field for beam search")


def generation_params(req: _Common) -> dict:
    """genkit parameters for a request: OpenAI's fields mapped, then the extra fields."""
    _refuse_unsupported(req)
    shared = {k: getattr(req, k, None) for k in SHARED if getattr(req, k, None) is not None}
    try:
        params = P.check_params(openai_params(shared), "body")
    except (ValueError, GenkitError) as e:
        param = "response_format" if "response_format" in str(e) else None
        raise APIError(400, str(e), param=param) from None
    if req.logit_bias:
        params["sequence_bias"] = _sequence_bias(req.logit_bias)
    for key, value in (req.model_extra or {}).items():
        name = P.ALIASES.get(key, key)
        if name in NOT_PER_REQUEST:
            raise _refuse(key, "start the server with the settings you need instead")
        if name not in P.PARAMS:
            known = list(P.PARAMS) + list(type(req).model_fields)
            raise APIError(400, f"unknown field '{key}'{did_you_mean(key, known)}: OpenAI's fields and "
                                "genkit's generation parameters (`genkit presets params`) are accepted",
                           param=key, code="unknown_parameter")
        try:
            params.update([P.check_param(key, value, f"field '{key}'")])
        except GenkitError as e:
            raise APIError(400, e.message, param=key) from None
    return params


def logprobs_of(req: _Common) -> int | None:
    """How many alternatives per token a request wants with its log-probabilities (None: no
    log-probabilities): chat's `logprobs: true` + `top_logprobs`, or completions' `logprobs: N`."""
    if isinstance(req, ChatRequest):
        try:
            return from_openai({"logprobs": req.logprobs, "top_logprobs": req.top_logprobs})
        except ValueError as e:
            raise APIError(400, str(e), param="top_logprobs") from None
    if req.logprobs is None:
        return None
    if not 0 <= req.logprobs <= MAX_TOP:
        raise APIError(400, f"logprobs {req.logprobs}: expected an integer from 0 to {MAX_TOP}", param="logprobs")
    return req.logprobs


def _sequence_bias(logit_bias: dict[str, float]) -> list:
    out = []
    for token, bias in logit_bias.items():
        if not token.isdigit():
            raise APIError(400, f"logit_bias: key {token!r} is not a token id", param="logit_bias")
        out.append([[int(token)], float(bias)])
    return out


def prompts_of(req: _Common) -> list[Any]:
    """What genkit generates from: the chat messages, or each completion prompt."""
    if isinstance(req, ChatRequest):
        try:
            return [messages_of(req.messages)]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts or not all(p.strip() for p in prompts):
        raise APIError(400, "'prompt' must be a non-empty string or a list of them", param="prompt")
    return prompts

"""The HTTP side: FastAPI routes in OpenAI's shapes, bearer-token checks, SSE, and uvicorn.

Handlers only parse, submit and relay: the engine thread (genkit/server/scheduler.py) runs the
model, and genkit/server/service.py turns requests into its work and events into responses.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from genkit.errors import GenkitError
from genkit.server import schema, service as S
from genkit.server.scheduler import Closing, Done, Engine, Overloaded

# How often a non-streaming request looks whether its client is still there.
DISCONNECT_POLL_S = 0.5


def create_app(svc: S.Service, engine: Engine, *, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="genkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    auth = [Depends(_bearer_check(api_key))] if api_key else []

    @app.exception_handler(schema.APIError)
    async def api_error(_request, e: schema.APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(GenkitError)
    async def genkit_error(_request, e: GenkitError):
        return JSONResponse(schema.APIError(400, e.message).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_request, e: Exception):
        message = f"internal error: {type(e).__name__}: {e}"
        return JSONResponse(schema.APIError(500, message, type="server_error").body(), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        return JSONResponse(schema.APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": svc.name, "running_rows": engine.running, "waiting": engine.waiting,
                **engine.stats()}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [_model_card(m) for m in svc.models()]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str):
        svc.preset_of(model)  # 404 when unknown
        return _model_card(model)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request):
        return await _complete(request, schema.ChatRequest, svc, engine)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        return await _complete(request, schema.CompletionRequest, svc, engine)

    return app


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "genkit"}


def _bearer_check(api_key: str) -> Callable:
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the first difference lies.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise schema.APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the "
                                       "key the server was started with", code="invalid_api_key",
                                  type="authentication_error")
    return check


async def _complete(request: Request, kind, svc: S.Service, engine: Engine):
    req = schema.parse(await request.body(), kind)
    prepared = svc.prepare(req, asyncio.get_running_loop())
    try:
        engine.submit(prepared.works)
    except Overloaded:
        raise schema.APIError(429, f"genkit serve is busy: {engine.max_waiting} requests are already waiting "
                                   "(--max-queue); retry shortly", code="overloaded", type="rate_limit_error") from None
    except Closing:
        raise schema.APIError(503, "genkit serve is shutting down", code="unavailable", type="server_error") from None
    if req.stream:
        return StreamingResponse(_sse(prepared), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        collected = await _collect(prepared, request)
    finally:
        prepared.cancel()  # no-op when finished; frees the rows when the client went away
    if collected.error:
        raise schema.APIError(500, collected.error, type="server_error")
    return S.completion(prepared, collected)


async def _events(p: S.Prepared, request: Request | None) -> AsyncIterator[tuple[int, object]]:
    """(prompt index, Event or Done) until every prompt is done; stops early when the client
    of a non-streaming request has gone (a stream learns that from Starlette's cancellation).
    The client is looked at every DISCONNECT_POLL_S, whether events are flowing or not."""
    loop = asyncio.get_running_loop()
    left, next_look = len(p.works), loop.time() + DISCONNECT_POLL_S
    queue = p.channel.queue
    while left:
        if request is None:  # a stream: nothing to poll, and no timer per token
            item = await queue.get()
        else:
            try:
                item = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(
                    queue.get(), max(0.01, next_look - loop.time()))
            except asyncio.TimeoutError:
                item = None
        if request is not None and loop.time() >= next_look:
            next_look = loop.time() + DISCONNECT_POLL_S
            if await request.is_disconnected():
                p.cancel()
                return
        if item is None:
            continue
        if isinstance(item[1], Done):
            left -= 1
        yield item


async def _collect(p: S.Prepared, request: Request) -> S.Collected:
    c = S.Collected(texts=[""] * p.choices, finish=[None] * p.choices, records=[[] for _ in range(p.choices)])
    async for i, item in _events(p, request):
        if isinstance(item, Done):
            c.prompt_tokens += item.prompt_tokens
            c.completion_tokens += item.completion_tokens
            c.cached_tokens += item.cached_tokens
            c.error = c.error or item.error
            continue
        at = i * p.n + item.index
        c.texts[at] += item.text
        c.finish[at] = item.finish_reason or c.finish[at]
        c.records[at] += S.records(p, item)
    return c


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(p: S.Prepared) -> AsyncIterator[str]:
    """The stream's events; those ready together (a request's n rows, or tokens that came while
    the loop was busy) go out in one write: fewer sends for the server and reads for the client."""
    pending: list[str] = []
    try:
        async for data in _chunks(p):
            pending.append(data)
            if p.channel.queue.empty():
                yield "".join(pending)
                pending.clear()
        if pending:
            yield "".join(pending)
    finally:
        p.cancel()  # the client disconnected (the task was cancelled) or the stream ended


async def _chunks(p: S.Prepared) -> AsyncIterator[str]:
    """OpenAI's chunks: the role first (chat), text deltas (with their tokens' log-probabilities
    when asked), each choice's finish, the usage."""
    prompt_tokens = completion_tokens = cached_tokens = 0
    offsets = [0] * p.choices  # where each choice's next token starts in its text (completions)
    if p.object == "chat.completion":
        yield _data(S.chunk(p, [S.delta_choice(p, k, "", None, first=True) for k in range(p.choices)]))
    async for i, item in _events(p, None):
        if isinstance(item, Done):
            prompt_tokens += item.prompt_tokens
            completion_tokens += item.completion_tokens
            cached_tokens += item.cached_tokens
            if item.error:
                yield _data(schema.APIError(500, item.error, type="server_error").body())
            continue
        at = i * p.n + item.index
        recs = S.records(p, item)
        if item.text or item.finish_reason or recs:
            logprobs = S.logprobs_object(p, recs, offsets[at]) if recs else None
            offsets[at] += sum(len(r["token"]) for r in recs)
            yield _data(S.chunk(p, [S.delta_choice(p, at, item.text, item.finish_reason, logprobs=logprobs)]))
    if p.include_usage:
        yield _data(S.chunk(p, [], S.usage(prompt_tokens, completion_tokens, cached_tokens)))
    yield "data: [DONE]\n\n"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads so that a taken port fails fast."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise GenkitError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port "
                          "or stop the program that holds it") from None
    sock.set_inheritable(True)
    return sock


def run(app: FastAPI, *, sock: socket.socket, shutdown_timeout: float,
        on_ready: Callable[[str, int], None]) -> None:
    """Serve until SIGTERM or Ctrl-C, then let running requests finish (cancelling what is left
    after `shutdown_timeout` seconds) and return normally, so the command exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn re-raises the signal once it has shut down, which would end the process
            # with the signal's status: a requested stop is a clean exit here.
            if self.should_exit:
                # A second signal: stop now. Running requests are cut off; uvicorn's report of
                # the lifespan task it cancels on the way out is noise to the person who asked.
                self.force_exit = True
                logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()
                on_ready(bound[0], bound[1])

    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    Server(config).run(sockets=[sock])

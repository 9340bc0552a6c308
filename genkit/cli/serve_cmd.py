"""`genkit serve`: the loaded model behind an OpenAI-compatible HTTP API (genkit/server/)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from genkit.cli import options as o
from genkit.models import LoadOptions

S = "Server"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


@o.model_options
def serve(
    model: o.Model = None,
    host: Annotated[str, typer.Option(
        "--host", rich_help_panel=S, help="Address to listen on (0.0.0.0 opens the server to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", rich_help_panel=S, help="Port (0: any free port).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="GENKIT_API_KEY", show_envvar=True, rich_help_panel=S,
        help="Require 'Authorization: Bearer KEY' on /v1 (default: no key).")] = None,
    served_name: Annotated[Optional[str], typer.Option(
        "--served-model-name", rich_help_panel=S,
        help="Model name clients use (default: the model's name; MODEL:PRESET picks a preset).")] = None,
    preset: o.Preset = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", rich_help_panel=S, help="Most sequences decoded together in the shared batch.")] = 32,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", rich_help_panel=S, help="Most requests waiting to start; more get HTTP 429.")] = 64,
    prefix_cache_mb: Annotated[float, typer.Option(
        "--prefix-cache-mb", rich_help_panel=S,
        help="Memory for recent prompts' KV cache (MiB): a prompt that begins like one of them prefills "
             "only the rest (0: off).")] = 256.0,
    shutdown_timeout: Annotated[float, typer.Option(
        "--shutdown-timeout", rich_help_panel=S,
        help="Seconds SIGTERM / Ctrl-C lets running requests finish before cancelling them.")] = 30.0,
    load: LoadOptions = None,
) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions)."""
    from genkit import presets
    from genkit.errors import GenkitError

    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue)):
        if value < 1:
            raise GenkitError(f"{name} {value}: expected at least 1")
    if prefix_cache_mb < 0:
        raise GenkitError(f"--prefix-cache-mb {prefix_cache_mb:g}: expected 0 (off) or more")
    if not 0 <= port <= 65535:
        raise GenkitError(f"--port {port}: expected a port number from 0 to 65535")
    if preset:
        presets.resolve(preset)  # a typo fails before the model loads
    from genkit.server.app import bind

    sock = bind(host, port)  # a taken port too
    lm = o.load_model(model, load)

    from genkit.engine import settings as settings_mod
    from genkit.server import app as server_app
    from genkit.server.scheduler import Engine
    from genkit.server.service import Service

    svc = Service(lm, name=served_name, preset=preset)
    engine = Engine(lm, settings_mod.build(lm, {}), max_rows=max_batch, max_waiting=max_queue,
                    prefix_cache_bytes=int(prefix_cache_mb * 2**20))
    app = server_app.create_app(svc, engine, api_key=api_key)

    def ready(bound_host: str, bound_port: int) -> None:
        key = ", API key required" if api_key else ""
        mode = "shared batch" if engine.batcher else "one request at a time"
        print(f"genkit serve: {svc.name} on http://{bound_host}:{bound_port}/v1 ({mode}{key}; Ctrl-C stops)",
              file=sys.stderr, flush=True)

    server_app.run(app, sock=sock, shutdown_timeout=shutdown_timeout, on_ready=ready)
    print("genkit serve: stopped", file=sys.stderr)

"""Hub ids (`--model org/name`): the local Hugging Face cache first, the network only when needed.

A model already in the cache loads from its snapshot directory without a network request
(otherwise a machine without network waits through half a minute of retries first). One that
is not there is downloaded by transformers, after a quick check that the Hub can be reached, so
that an offline machine gets one line at once instead.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from genkit.errors import GenkitError

log = logging.getLogger("genkit")


def locate(model_id: str) -> str:
    """The local snapshot directory of a cached hub model, else the id itself to download."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except HFValidationError:
        raise GenkitError(f"model '{model_id}' is not a model directory, a .gguf file nor a valid hub id "
                          "(org/name); check the spelling") from None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    where = constants.HF_HUB_CACHE
    fetch = f"`hf download {model_id}` where there is network, or pass a model directory or a .gguf file"
    if _offline():
        raise GenkitError(f"model '{model_id}' is not in the local Hugging Face cache ({where}) and "
                          f"HF_HUB_OFFLINE=1 keeps genkit off the network: get it with {fetch}")
    problem = None if _proxied() else _unreachable(constants.ENDPOINT)
    if problem:
        raise GenkitError(f"model '{model_id}' is not in the local Hugging Face cache ({where}) and "
                          f"{urlparse(constants.ENDPOINT).hostname} cannot be reached ({problem}): connect, "
                          f"or get it with {fetch}")
    log.info("downloading %s from the Hugging Face Hub into %s", model_id, where)
    return model_id


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _proxied() -> bool:
    """Behind a proxy a direct connection proves nothing: leave the check to the download."""
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why the Hub's host cannot be reached, or None: one name lookup and one connection."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__

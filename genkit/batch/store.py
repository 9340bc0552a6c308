"""Where records go: OUTPUT on disk (appends, resume scan, final rewrite) or a stream."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from genkit.batch.lock import OutputLock
from genkit.batch.records import dumps, identity
from genkit.errors import GenkitError


# Every line genkit writes starts so (json.dumps keeps the records' key order): a last line
# that does not is not a record genkit was killed writing, and is never cut off.
RECORD_START = b'{"id": '


@dataclass
class _Line:
    key: str
    ok: bool
    fingerprint: str | None
    path: Path
    offset: int
    length: int


class OutputStore:
    """OUTPUT and its parts: what earlier runs completed, appends, and the final rewrite.

    A process appends to one file (OUTPUT itself, or OUTPUT.part-R-of-N under accelerate).
    Every file of the job is read when the job starts (a record done anywhere is done), and the
    final rewrite merges them, the last line of a record winning (a failed record that a later
    run retried is replaced).
    """

    def __init__(self, path: Path, fmt: str, rank: int = 0, world: int = 1):
        self.path = path
        self.fmt = fmt
        self.rank, self.world = rank, world
        self.own = path if world == 1 else self.part_path(rank, world)
        self.lines: list[_Line] = []
        self._fh = None
        self._lock = OutputLock(path)

    def lock(self) -> None:
        """One job per OUTPUT (raises, naming the holder, when another one runs)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()

    def unlock(self) -> None:
        self._lock.release()

    def part_path(self, rank: int, world: int) -> Path:
        return self.path.with_name(f"{self.path.name}.part-{rank}-of-{world}")

    def parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.part-*-of-*"))

    def remove_all(self) -> None:
        """--overwrite: start over (OUTPUT, every part, leftovers of a killed rewrite)."""
        for p in [self.path, *self.parts(), *self._temps()]:
            p.unlink(missing_ok=True)

    def _temps(self) -> list[Path]:
        return list(self.path.parent.glob(f".{self.path.name}.tmp-*"))

    def load(self) -> dict[str, bool]:
        """Scan OUTPUT and the parts; key -> ok for every record there (the last line wins)."""
        self.lines = []
        for p in [self.path, *self.parts()]:
            if p.is_file():
                self.lines.extend(self._scan(p, repair=p == self.own))
        return {ln.key: ln.ok for ln in self.lines}

    def fingerprints(self) -> dict[str, str | None]:
        """key -> fingerprint of its latest line (after `load`)."""
        return {ln.key: ln.fingerprint for ln in self.lines}

    def _scan(self, path: Path, repair: bool) -> list[_Line]:
        """The records of one file. Only the last line may be incomplete (a kill in the middle of
        writing it): it is ignored, and cut off when `repair` (the file this process appends to).
        Anything else that is not one of genkit's records means -o names some other file: it is
        refused, never cut or replaced."""
        data = path.read_bytes()
        out, offset, number = [], 0, 0
        while offset < len(data):
            end = data.find(b"\n", offset)
            number += 1
            chunk = data[offset:] if end == -1 else data[offset:end]
            if not chunk.strip():
                offset = len(data) if end == -1 else end + 1
                continue
            ident, whole = _parse_line(chunk)
            if ident is None and end == -1 and not whole and chunk.startswith(RECORD_START):
                if repair:
                    os.truncate(path, offset)
                break
            if ident is None:
                raise GenkitError(
                    f"{path}: line {number} is not a genkit batch record, so -o names some other file; "
                    "genkit replaces only its own output: choose another -o (or --overwrite to replace it)"
                )
            if ident.fmt != self.fmt:
                raise GenkitError(
                    f"{path} holds records in the {ident.fmt} format but --output-format is {self.fmt}: "
                    "use the same format to resume, or --overwrite"
                )
            if end == -1 and repair:
                # The record is whole and only its newline is missing: finish the line.
                with open(path, "ab") as fh:
                    fh.write(b"\n")
            out.append(_Line(ident.key, ident.ok, ident.fingerprint, path, offset, len(chunk)))
            offset = len(data) if end == -1 else end + 1
        return out

    def open(self) -> None:
        self.own.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.own, "ab", buffering=0)

    def write(self, record: dict) -> None:
        """One record, one write call, flushed: a kill leaves whole lines and at most one half line."""
        data = (dumps(record) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            n = self._fh.write(view)
            view = view[n:]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finalize(self, order: list[str] | None) -> tuple[int, int]:
        """Rewrite OUTPUT from every file of the job: records in `order` (input order), or in
        the order they were written when `order` is None; then drop the parts. Returns the
        number of records in OUTPUT and how many of them failed."""
        self.load()
        latest: dict[str, _Line] = {}
        for ln in self.lines:
            latest[ln.key] = ln
        if order is None:
            order = [ln.key for ln in self.lines if latest[ln.key] is ln]
        elif set(latest) - set(order):
            foreign = sorted(set(latest) - set(order))[0]
            raise GenkitError(f"{self.path} has a record with id {foreign} that is not in the input; "
                              "is it the output of another job? Pass --overwrite to start over")
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        handles: dict[Path, Any] = {}
        try:
            with open(tmp, "wb") as out:
                _keep_mode(self.path, out.fileno())
                for key in order:
                    ln = latest.get(key)
                    if ln is None:
                        continue
                    fh = handles.get(ln.path) or handles.setdefault(ln.path, open(ln.path, "rb"))
                    fh.seek(ln.offset)
                    out.write(fh.read(ln.length) + b"\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk, say: the records appended so far stay
            raise
        finally:
            for fh in handles.values():
                fh.close()
        # What the final file now holds: the parts, and temporary files of rewrites killed midway.
        for p in [*self.parts(), *self._temps()]:
            p.unlink(missing_ok=True)
        written = [key for key in order if key in latest]
        return len(written), sum(1 for key in written if not latest[key].ok)


def _parse_line(chunk: bytes):
    """(identity or None, whether the line is whole JSON)."""
    try:
        return identity(json.loads(chunk)), True
    except ValueError:  # invalid JSON or invalid UTF-8
        return None, False


def _keep_mode(path: Path, fd: int) -> None:
    """The rewritten OUTPUT keeps the permissions the user gave the file."""
    try:
        os.fchmod(fd, path.stat().st_mode & 0o7777)
    except OSError:
        pass


class StdoutSink:
    """Records to a stream: in input order (holding back the ones that finish early), or as
    they finish with `unordered`."""

    def __init__(self, stream: TextIO, order: list[str] | None, close: bool = False):
        self.stream = stream
        self._close = close
        self.order = order
        self.pending: dict[str, dict] = {}
        self.next = 0

    def write(self, record: dict) -> None:
        if self.order is None:
            self._emit(record)
            return
        self.pending[identity(record).key] = record
        while self.next < len(self.order) and self.order[self.next] in self.pending:
            self._emit(self.pending.pop(self.order[self.next]))
            self.next += 1

    def _emit(self, record: dict) -> None:
        self.stream.write(dumps(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._close:
            self.stream.close()


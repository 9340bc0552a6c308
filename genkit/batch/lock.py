"""One writer per OUTPUT: an advisory lock beside it, naming the process that holds it.

`flock` is released by the kernel when its holder dies (kill -9 included), so a crashed job
never leaves a stale lock behind; the lock file is removed by whoever releases it. A second
job on the same OUTPUT (a second `--overwrite` above all) is refused instead of erasing
records the first one still reports as written.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from genkit.errors import GenkitError


class OutputLock:
    def __init__(self, output: Path):
        self.output = output
        self.path = output.with_name(f".{output.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise the one line that says who holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise GenkitError(
                    f"{self.output} is being written by another genkit batch ({holder or 'a running process'}); "
                    "wait for it to finish, or write to another -o"
                ) from None
            # The previous holder may have removed the file between our open and our lock:
            # then we hold a lock on a name nobody else sees, so start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: nobody can lock the old file
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""

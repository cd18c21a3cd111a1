"""One server per output folder: an exclusive lock on a file in it, held for the life of the process."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Optional

from ..errors import LanceError

LOCK_NAME = ".lance-server.lock"


class FolderInUse(LanceError):
    """Another server already serves this output folder."""


class OutputLock:
    """`fcntl.flock` on `<output_dir>/.lance-server.lock`: the kernel drops it when the process ends, however it
    ends, so a crashed server never blocks the next one. The file holds the owner's pid and port for the message a
    second server prints."""

    def __init__(self, output_dir: Path, port: Optional[int] = None):
        self.path = Path(output_dir) / LOCK_NAME
        self.port = port
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _owner(fd)
            os.close(fd)
            raise FolderInUse(f"another lance-mlx server ({owner}) already uses --output-dir {self.path.parent}"
                              "; stop it or choose another --output-dir", "output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "port": self.port}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock; the file stays (removing it would race)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 256, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    pid, port = info.get("pid"), info.get("port")
    if pid is None:
        return "pid unknown"
    return f"pid {pid}" + (f", port {port}" if port is not None else "")

"""The writer's lock: one extraction at a time writes a given cache.

A POSIX record lock (lockf) on `OUT.lock`: the kernel drops it when the process dies, so a killed
run never leaves a stale lock, and unlike flock it is not shared with forked DataLoader workers,
which could otherwise outlive a killed parent and keep holding it.
"""

from __future__ import annotations

import fcntl
import os

from ..errors import TransferError
from ..files import remove_quietly


class WriterLock:
    """An exclusive, non-blocking lock on `OUT.lock`, held for a whole extraction."""

    _held: set[str] = set()  # POSIX locks do not exclude the same process: track its own locks here

    def __init__(self, out: str):
        self.path = out + ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "WriterLock":
        if os.path.abspath(self.path) in WriterLock._held:
            raise TransferError(f"another extract (pid {os.getpid()}) is writing {self.path[:-5]}; "
                                "wait for it to finish or stop it first")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise TransferError(f"another extract (pid {holder}) is writing {self.path[:-5]}; "
                                    "wait for it to finish or stop it first") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder removed this file as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        WriterLock._held.add(os.path.abspath(self.path))
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            remove_quietly(self.path)  # while still held; a waiter that opened it re-checks the inode
            os.close(self._fd)
            self._fd = None
            WriterLock._held.discard(os.path.abspath(self.path))

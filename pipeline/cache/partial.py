"""The resumable working file of one extraction (or of one rank's shard of it): `OUT.partial`.

Every dataset is created and allocated up front, then the file is closed; later writes only change
raw data at fixed offsets, never HDF5 metadata, so a kill at any moment leaves a readable file. A
per-row `status` byte, written after the row's features are flushed, is the commit marker.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import h5py
import numpy as np

from ..errors import TransferError
from ..files import display_path, remove_quietly
from .format import (BYTES, DONE, FAILED, FORMAT, FORMAT_VERSION, PENDING, REASON_BYTES, STR, objects, os_reason,
                     partial_path, read_attrs, write_attrs)


def shard_path_of(out: str, rank: int, world: int) -> str:
    """The partial file of rank `rank` of `world` processes: OUT.partial for a single process."""
    if world == 1:
        return partial_path(out)
    return f"{out}.rank{rank:04d}-of-{world:04d}.partial"


def existing_shards(out: str) -> list[str]:
    """The torchrun shard files of `out` on disk, in rank order."""
    return sorted(glob.glob(glob.escape(out) + ".rank*-of-*.partial"))


def _fixed_dataset(f: h5py.File, name: str, shape: tuple, dtype) -> None:
    """A contiguous dataset whose file space is reserved now (sparse, never filled), so writing
    into it later touches raw bytes only, never HDF5 metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=1)
    h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create_simple(shape), dcpl=dcpl).close()


@dataclass
class Progress:
    total: int
    done: int
    failed: int

    @property
    def finished(self) -> int:
        return self.done + self.failed


class PartialCache:
    """The resumable working file of one extraction, or of one rank's shard of it.

    Rows are listing positions `positions[0] .. positions[n-1]`; `features` (n, D) float32,
    `status` (n,) uint8 (0 pending, 1 done, 2 failed), `reasons` (n,) for failed rows.
    """

    def __init__(self, path: str):
        self.path = path
        self._file: h5py.File | None = None
        self._inode: int | None = None

    @classmethod
    def create(cls, path: str, meta: dict, positions: np.ndarray, paths: list[str],
               labels: np.ndarray, splits: list[str] | None, dim: int) -> "PartialCache":
        """Write the whole file once, under a temporary name, then rename it into place."""
        n = len(positions)
        tmp = f"{path}.creating-{os.getpid()}"
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                write_attrs(f, {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "state": "partial"})
                f.create_dataset("positions", data=np.asarray(positions, dtype=np.int64))
                f.create_dataset("paths", data=objects(display_path(p) for p in paths), dtype=STR)
                f.create_dataset("path_bytes", data=objects(os.fsencode(p) for p in paths), dtype=BYTES)
                f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
                if splits is not None:
                    f.create_dataset("split", data=objects(splits), dtype=STR)
                _fixed_dataset(f, "features", (n, dim), np.float32)
                _fixed_dataset(f, "status", (n,), np.uint8)
                _fixed_dataset(f, "reasons", (n,), f"S{REASON_BYTES}")
            os.replace(tmp, path)
        except OSError as e:
            remove_quietly(tmp)
            raise TransferError(f"cannot create {path}: {e.strerror or e}") from None
        return cls(path)

    @staticmethod
    def read_meta(path: str) -> dict:
        with h5py.File(path, "r", locking=False) as f:
            return read_attrs(f)

    def progress(self) -> Progress:
        with h5py.File(self.path, "r", locking=False) as f:
            status = f["status"][...]
        return Progress(len(status), int((status == DONE).sum()), int((status == FAILED).sum()))

    def pending_rows(self) -> np.ndarray:
        """(k,) int64 row numbers still to do, in order."""
        with h5py.File(self.path, "r", locking=False) as f:
            return np.flatnonzero(f["status"][...] == PENDING)

    def positions(self) -> np.ndarray:
        with h5py.File(self.path, "r", locking=False) as f:
            return f["positions"][...]

    # writing ---------------------------------------------------------------------------------

    def open(self) -> "PartialCache":
        try:
            self._file = h5py.File(self.path, "r+", locking=False)
        except OSError as e:
            raise TransferError(f"cannot open {self.path} for writing: {e}") from None
        self._inode = os.stat(self.path).st_ino
        return self

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def __enter__(self) -> "PartialCache":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def commit(self, rows: np.ndarray, features: np.ndarray, failed: list[tuple[int, str]]) -> None:
        """Store features (k, D) of rows (k,) and mark failed rows; the status write comes last,
        after a flush, so a row is marked done only once its features are on disk."""
        f = self._file
        try:
            self._check_still_there()
            for lo, hi, sel in _runs(rows):
                f["features"][lo:hi] = features[sel]
            for row, reason in failed:
                f["reasons"][row] = reason.encode("utf-8")[:REASON_BYTES]
            f.flush()
            marks = [(int(r), DONE) for r in rows] + [(int(r), FAILED) for r, _ in failed]
            marks.sort()
            all_rows = np.array([r for r, _ in marks], dtype=np.int64)
            values = np.array([v for _, v in marks], dtype=np.uint8)
            for lo, hi, sel in _runs(all_rows):
                f["status"][lo:hi] = values[sel]
            f.flush()
        except (OSError, RuntimeError) as e:  # HDF5 reports some failed writes as RuntimeError
            raise TransferError(
                f"writing {self.path} failed ({os_reason(e)}); the rows committed before it are "
                "intact: fix the cause and rerun the same command to resume"
            ) from None

    def _check_still_there(self) -> None:
        try:
            same = os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            same = False
        if not same:
            raise TransferError(f"{self.path} was removed or replaced while extracting; stopped")


def _runs(rows: np.ndarray):
    """Split sorted row numbers into runs of consecutive rows: yields (lo, hi, index slice)."""
    if len(rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    for s, e in zip(starts, ends):
        yield int(rows[s]), int(rows[e - 1]) + 1, slice(int(s), int(e))


def remove_stale_temporaries(path: str, kind: str) -> None:
    """Delete `path.<kind>-PID` files a killed run left half-written. Call while holding the lock
    that covers `path`."""
    for leftover in glob.glob(glob.escape(path) + f".{kind}-*"):
        remove_quietly(leftover)

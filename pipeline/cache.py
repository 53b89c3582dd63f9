"""The feature cache: HDF5 files that hold embeddings, their images' paths and labels, and provenance.

Stage 1c of images -> backbone -> cache -> head -> model. docs/cache-format.md is the reference.

Two kinds of file:
- `OUT.partial`, the resumable working file of one extraction (or of one rank's shard). Every
  dataset is created and allocated up front, then the file is closed; later writes only change raw
  data at fixed offsets, never HDF5 metadata, so a kill at any moment leaves a readable file. A
  per-row `status` byte, written after the row's features are flushed, is the commit marker.
- `OUT`, the finished cache, assembled from the partial file(s) by a streamed copy into a
  temporary file that is renamed into place: it exists only once it is complete.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import gc
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import h5py
import numpy as np

from .errors import TransferError

FORMAT = "transfer.features"
FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
REASON_BYTES = 200
COPY_ROWS = 2048  # rows per block when streaming features from partial to final
# Settings that make two extractions interchangeable; any difference refuses a resume or a reuse.
IDENTITY_KEYS = ("backbone", "weights", "weights_sha256", "pretrained", "seed", "layer", "dim",
                 "preprocessing", "precision", "listing_sha256", "source", "model", "versions", "tta")

_STR = h5py.string_dtype("utf-8")
_BYTES = h5py.string_dtype("ascii")  # h5py stores these bytes as they are: lossless file names


def partial_path(out: str) -> str:
    return out + ".partial"


def display_path(path: str) -> str:
    """A file name as UTF-8 text; undecodable bytes are shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def listing_digest(classes: list[str], paths: list[str], labels: np.ndarray, splits: list[str] | None) -> str:
    """sha256 over everything that fixes the rows of a cache: their order, files and labels."""
    digest = hashlib.sha256(json.dumps(classes).encode())
    for i, p in enumerate(paths):
        digest.update(os.fsencode(p) + b"\0" + str(int(labels[i])).encode() + b"\0")
        digest.update((splits[i] if splits else "").encode() + b"\n")
    return digest.hexdigest()


def identity(meta: dict) -> dict:
    """The settings that decide the features, in a form comparable across a file round trip."""
    return json.loads(json.dumps({k: meta.get(k) for k in IDENTITY_KEYS}))


def describe_difference(old: dict, new: dict) -> str:
    old, new = identity(old), identity(new)
    keys = [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]
    shown = []
    for k in keys:
        if k == "listing_sha256":
            shown.append("the image folder's files or labels")
        else:
            shown.append(f"{k} {_brief(old.get(k))} vs {_brief(new.get(k))}")
    return "; ".join(shown)


def _brief(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- attributes -------------------------------------------------------------------------------

def _write_attrs(obj, meta: dict) -> None:
    for key, value in meta.items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value)
        elif value is None:
            value = ""
        elif isinstance(value, str):
            value = str(value)  # plain str: h5py cannot store subclasses such as torch's TorchVersion
        obj.attrs[key] = value


def _read_attrs(obj) -> dict:
    meta = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        meta[key] = value
    return meta


def _objects(items) -> np.ndarray:
    """A 1-D object array: what h5py needs to write variable-length strings."""
    items = list(items)
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _fixed_dataset(f: h5py.File, name: str, shape: tuple, dtype) -> None:
    """A contiguous dataset whose file space is reserved now (sparse, never filled), so writing
    into it later touches raw bytes only, never HDF5 metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=1)
    h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create_simple(shape), dcpl=dcpl).close()


# --- the partial (working) file -----------------------------------------------------------------

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
                _write_attrs(f, {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "state": "partial"})
                f.create_dataset("positions", data=np.asarray(positions, dtype=np.int64))
                f.create_dataset("paths", data=_objects(display_path(p) for p in paths), dtype=_STR)
                f.create_dataset("path_bytes", data=_objects(os.fsencode(p) for p in paths), dtype=_BYTES)
                f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
                if splits is not None:
                    f.create_dataset("split", data=_objects(splits), dtype=_STR)
                _fixed_dataset(f, "features", (n, dim), np.float32)
                _fixed_dataset(f, "status", (n,), np.uint8)
                _fixed_dataset(f, "reasons", (n,), f"S{REASON_BYTES}")
            os.replace(tmp, path)
        except OSError as e:
            _remove_quietly(tmp)
            raise TransferError(f"cannot create {path}: {e.strerror or e}") from None
        return cls(path)

    @staticmethod
    def read_meta(path: str) -> dict:
        with h5py.File(path, "r", locking=False) as f:
            return _read_attrs(f)

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
                f"writing {self.path} failed ({_os_reason(e)}); the rows committed before it are "
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


def _os_reason(e: Exception) -> str:
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or "No space left" in str(e) or "errno = 28" in str(e):
        return "no space left on device"
    if code == errno.EFBIG or "File too large" in str(e):
        return "file too large for this file system or limit"
    return getattr(e, "strerror", None) or " ".join(str(e).split())[:200]


def remove_stale_temporaries(path: str, kind: str) -> None:
    """Delete `path.<kind>-PID` files a killed run left half-written. Call while holding the lock
    that covers `path`."""
    for leftover in glob.glob(glob.escape(path) + f".{kind}-*"):
        _remove_quietly(leftover)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --- assembling the final cache -------------------------------------------------------------------

def assemble(parts: list[str], out: str, meta: dict) -> "CacheInfo":
    """Stream the committed rows of partial files (in order) into `out`; rename into place at the end.

    Nothing named `out` exists until every row has been copied.
    """
    remove_stale_temporaries(out, "assembling")
    tmp = f"{out}.assembling-{os.getpid()}"
    _check_free_space(parts, out)
    try:
        with _quiet_h5py_teardown():
            with h5py.File(tmp, "w") as dst:
                _assemble_into(dst, parts, meta)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:  # HDF5 reports failed writes at close as RuntimeError
        _remove_quietly(tmp)
        raise TransferError(
            f"writing {out} failed ({_os_reason(e)}); the extracted features are safe in "
            f"{', '.join(parts)}: fix the cause and rerun the same command to finish"
        ) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    return read_info(out)


def _check_free_space(parts: list[str], out: str) -> None:
    """Fail before writing when the final copy clearly cannot fit (it is about the partials' size)."""
    needed = sum(os.stat(p).st_blocks * 512 for p in parts)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
    if needed > free:
        raise TransferError(
            f"writing {out} needs about {needed / 2**20:.1f} MB but only {free / 2**20:.1f} MB are free "
            f"(no space left on device); the extracted features are safe in {', '.join(parts)}: "
            "free some space and rerun the same command to finish"
        )


@contextlib.contextmanager
def _quiet_h5py_teardown():
    """When a write fails, h5py also reports each object it can no longer close through
    sys.unraisablehook (a traceback on stderr); the failure itself is raised and reported once."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def _assemble_into(dst: h5py.File, parts: list[str], meta: dict) -> None:
    sources = [h5py.File(p, "r", locking=False) for p in parts]
    try:
        status = [s["status"][...] for s in sources]
        n_ok = int(sum((st == DONE).sum() for st in status))
        n_failed = int(sum((st == FAILED).sum() for st in status))
        if n_ok + n_failed != sum(len(st) for st in status):
            raise TransferError("cannot assemble: some rows are still pending")
        expected = identity(meta)
        for part, src in zip(parts, sources):
            if identity(_read_attrs(src)) != expected:
                raise TransferError(f"cannot assemble: {part} was made with other settings "
                                    f"({describe_difference(_read_attrs(src), meta)})")
        positions = np.concatenate([s["positions"][...] for s in sources])
        if "num_listed" in meta and not np.array_equal(positions, np.arange(int(meta["num_listed"]))):
            raise TransferError(f"cannot assemble: the shards {', '.join(parts)} do not cover the "
                                f"{meta['num_listed']} listed images exactly once, in order")
        dim = int(sources[0]["features"].shape[1])
        has_split = "split" in sources[0]
        chunk_rows = max(1, min(n_ok, (1 << 20) // (4 * dim)))  # ~1 MiB chunks
        features = dst.create_dataset("features", (n_ok, dim), np.float32, chunks=(chunk_rows, dim) if n_ok else None)
        cols = {"labels": [], "paths": [], "path_bytes": [], "split": []}
        failed = {"paths": [], "path_bytes": [], "reasons": []}
        k = 0
        for src, st in zip(sources, status):
            ok = st == DONE
            for lo in range(0, len(st), COPY_ROWS):
                hi = min(lo + COPY_ROWS, len(st))
                sel = ok[lo:hi]
                if sel.any():
                    block = src["features"][lo:hi][sel]
                    features[k:k + len(block)] = block
                    k += len(block)
            paths = src["paths"].asstr()[...]
            raw = src["path_bytes"][...]
            cols["labels"].append(src["labels"][...][ok])
            cols["paths"].append(paths[ok])
            cols["path_bytes"].append(raw[ok])
            if has_split:
                cols["split"].append(src["split"].asstr()[...][ok])
            bad = st == FAILED
            failed["paths"].append(paths[bad])
            failed["path_bytes"].append(raw[bad])
            failed["reasons"].append(np.array([r.decode("utf-8", "replace") for r in src["reasons"][...][bad]],
                                              dtype=object))
        dst.create_dataset("labels", data=np.concatenate(cols["labels"]).astype(np.int64))
        dst.create_dataset("paths", data=np.concatenate(cols["paths"]).astype(object), dtype=_STR)
        dst.create_dataset("path_bytes", data=np.concatenate(cols["path_bytes"]).astype(object), dtype=_BYTES)
        if has_split:
            dst.create_dataset("split", data=np.concatenate(cols["split"]).astype(object), dtype=_STR)
        group = dst.create_group("failed")
        group.create_dataset("paths", data=np.concatenate(failed["paths"]).astype(object), dtype=_STR)
        group.create_dataset("path_bytes", data=np.concatenate(failed["path_bytes"]).astype(object), dtype=_BYTES)
        group.create_dataset("reasons", data=np.concatenate(failed["reasons"]).astype(object), dtype=_STR)
        _write_attrs(dst, {
            **meta,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "state": "complete",
            "num_images": n_ok,
            "num_failed": n_failed,
            "assembled": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    finally:
        for s in sources:
            s.close()


# --- reading ----------------------------------------------------------------------------------------

@dataclass
class CacheInfo:
    """What a finished cache holds, without its features.

    labels: (N,) int64; paths: N display paths relative to image_dir; splits: (N,) str or None.
    """

    path: str
    meta: dict
    classes: list[str]
    labels: np.ndarray
    paths: list[str]
    splits: np.ndarray | None
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def read_features(self, rows: np.ndarray | None = None, dtype=np.float32,
                      out: np.ndarray | None = None) -> np.ndarray:
        """Features of `rows` (default all, in order) as (len(rows), D) `dtype`, read in blocks
        straight into one array: no full-size temporary in float32."""
        return read_features(self.path, rows, dtype, out)


def read_features(path: str, rows: np.ndarray | None = None, dtype=np.float32,
                  out: np.ndarray | None = None) -> np.ndarray:
    with h5py.File(path, "r") as f:
        ds = f["features"]
        n, dim = ds.shape
        rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), dim), dtype=dtype)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise TransferError(f"row numbers out of range for {path} ({n} rows)")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for lo in range(0, n, COPY_ROWS):
            a, b = np.searchsorted(sorted_rows, [lo, lo + COPY_ROWS])
            if a == b:
                continue
            block = ds[lo:min(lo + COPY_ROWS, n)][sorted_rows[a:b] - lo]
            if not np.isfinite(block).all():  # checked per block: no full-size boolean temporary
                raise TransferError(f"{path} holds non-finite features (NaN or inf); re-extract it at fp32")
            out[order[a:b]] = block
        return out


def read_info(path: str) -> CacheInfo:
    """Open a finished cache, or explain clearly why `path` is not one."""
    meta = check_cache(path)
    with h5py.File(path, "r") as f:
        splits = f["split"].asstr()[...] if "split" in f else None
        failed = []
        if "failed" in f:
            failed = list(zip(f["failed/paths"].asstr()[...], f["failed/reasons"].asstr()[...]))
        return CacheInfo(
            path=path,
            meta=meta,
            classes=list(meta["classes"]),
            labels=f["labels"][...].astype(np.int64),
            paths=list(f["paths"].asstr()[...]),
            splits=splits,
            failed=failed,
        )


def check_cache(path: str) -> dict:
    """Return a finished cache's attributes; raise a one-line TransferError for anything else."""
    if not os.path.exists(path):
        parts = [partial_path(path)] if os.path.exists(partial_path(path)) else sorted(
            glob.glob(glob.escape(path) + ".rank*-of-*.partial"))
        if parts:
            meta = PartialCache.read_meta(parts[0])
            progress = [_partial_progress(p) for p in parts]
            raise TransferError(incomplete_message(path, meta, Progress(sum(p.total for p in progress),
                                                                        sum(p.done for p in progress),
                                                                        sum(p.failed for p in progress))))
        raise TransferError(f"no feature cache at {path}; create one with `transfer extract IMAGE_DIR --out {path}`")
    if os.path.isdir(path):
        raise TransferError(f"{path} is a folder; expected a feature cache file (.h5) written by `transfer extract`")
    if not h5py.is_hdf5(path):
        raise TransferError(f"{path} is not a feature cache (not an HDF5 file); expected the output of `transfer extract`")
    try:
        with h5py.File(path, "r", locking=False) as f:
            meta = _read_attrs(f)
            datasets = set(f.keys())
    except OSError as e:
        raise TransferError(f"cannot read {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise TransferError(f"{path} is an HDF5 file but not a transfer feature cache (no format={FORMAT!r} attribute)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise TransferError(f"{path} has cache format version {meta['format_version']}; this transfer reads up to "
                            f"{FORMAT_VERSION}: upgrade transfer")
    if meta.get("state") != "complete":
        raise TransferError(incomplete_message(path, meta, _partial_progress(path)))
    missing = {"features", "labels", "paths"} - datasets
    if missing:
        raise TransferError(f"{path} is damaged: missing datasets {', '.join(sorted(missing))}")
    return meta


def _partial_progress(path: str) -> Progress:
    try:
        return PartialCache(path).progress()
    except (OSError, KeyError):
        raise TransferError(f"{path} is not a finished cache and is damaged (no readable progress); "
                            "extract it again") from None


def incomplete_message(path: str, meta: dict, progress: Progress) -> str:
    command = meta.get("command") or "transfer extract IMAGE_DIR --out " + path
    world = int(meta.get("world_size") or 1)
    how = f"torchrun again with {world} processes in all, each running: {command}" if world > 1 else command
    return (f"{path} is incomplete: extraction stopped at {progress.finished} of {progress.total} images; "
            f"resume it with: {how}")


# --- the writer's lock ---------------------------------------------------------------------------------

class WriterLock:
    """An exclusive, non-blocking lock on `OUT.lock`, held for a whole extraction.

    A POSIX record lock (lockf): the kernel drops it when the process dies, so a killed run never
    leaves a stale lock, and unlike flock it is not shared with forked DataLoader workers, which
    could otherwise outlive a killed parent and keep holding it.
    """

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
            _remove_quietly(self.path)  # while still held; a waiter that opened it re-checks the inode
            os.close(self._fd)
            self._fd = None
            WriterLock._held.discard(os.path.abspath(self.path))

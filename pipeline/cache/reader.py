"""Reading a finished feature cache: `read_cache(path) -> Cache`, the only way the library reads one.

Opening checks the file (format, version, completeness, the attributes every reader relies on)
and loads only the small per-row arrays; features are read on demand, in blocks, from the same
file: a Cache remembers which file it opened (device, inode, size, mtime) and refuses to read
another one put in its place (a rerun of `extract`), whose rows would not match its labels.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Iterator

import h5py
import numpy as np

from ..errors import IncompleteCacheError, InputFileError, SettingError
from ..files import display_path, not_a_file
from .format import COPY_ROWS, FORMAT, FORMAT_VERSION, partial_path, read_attrs
from .partial import PartialCache, Progress, existing_shards

SPLIT_NAMES = ("train", "val", "test")
# The largest feature magnitude accepted. Network features are O(1)-O(1e3); beyond 1e12 the sums of
# squares that standardization, PCA and the solvers compute overflow float32 (3.4e38) on large caches.
FEATURE_LIMIT = 1e12


class Cache:
    """A feature cache: N rows of D-dim features with their labels, files and provenance.

    labels: (N,) int64, an index into `classes`; split: (N,) str ("train"/"val"/"test") or None;
    paths / path_bytes: N names relative to `image_dir` (display text / exact bytes);
    provenance: every attribute of the file (backbone, weights, preprocessing, versions, ...).
    generation: which file was opened, (st_dev, st_ino, st_size, st_mtime_ns); every later read
    checks it (None: not checked).
    """

    def __init__(self, path: str | None, provenance: dict, classes: list[str], labels: np.ndarray,
                 split: np.ndarray | None, generation: tuple | None = None):
        self.path = path
        self.provenance = provenance
        self.classes = classes
        self.labels = labels
        self.split = split
        self.generation = generation

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.provenance["dim"])

    @property
    def image_dir(self) -> str | None:
        """The image folder the paths are relative to (exact bytes kept, as `os.fsdecode` gives them)."""
        raw = self.provenance.get("image_dir_bytes")
        if isinstance(raw, bytes):
            return os.fsdecode(raw)
        return self.provenance.get("image_dir") or None

    @cached_property
    def paths(self) -> list[str]:
        with self._file() as f:
            return list(f["paths"].asstr()[...])

    @cached_property
    def path_bytes(self) -> list[bytes]:
        with self._file() as f:
            return list(f["path_bytes"][...]) if "path_bytes" in f else [os.fsencode(p) for p in self.paths]

    @cached_property
    def columns(self) -> dict[str, np.ndarray]:
        """A manifest's extra columns: name -> (N,) str array, one value per row ({} for a folder)."""
        names = self.provenance.get("extra_columns") or []
        if not names:
            return {}
        with self._file() as f:
            return {name: f[f"columns/{name}"].asstr()[...].astype(object) for name in names}

    @cached_property
    def failed(self) -> list[tuple[str, str]]:
        """(display path, reason) of every image that could not be used."""
        with self._file() as f:
            if "failed" not in f:
                return []
            return list(zip(f["failed/paths"].asstr()[...], f["failed/reasons"].asstr()[...]))

    def features(self, rows: np.ndarray | None = None, dtype=np.float32, out: np.ndarray | None = None) -> np.ndarray:
        """Features of `rows` (default all, in order) as (len(rows), D) `dtype`, read in blocks
        straight into one array: no full-size temporary."""
        rows = None if rows is None else row_numbers(rows)
        count = self.n if rows is None else len(rows)
        if out is None:
            out = np.empty((count, self.dim), dtype=dtype)
        elif out.shape != (count, self.dim):
            raise ValueError(f"out has shape {out.shape}; expected {(count, self.dim)}")
        for idx, block in self.blocks(rows, COPY_ROWS, out.dtype):
            out[idx] = block
        return out

    def blocks(self, rows: np.ndarray | None = None, block_rows: int = 4096,
               dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (idx, X) over `rows` (default all) in file order, at most `block_rows` rows each:
        idx (b,) positions into `rows` (row numbers when rows is None), X (b, D) `dtype`.
        Memory stays O(block_rows x D) whatever N is."""
        rows = np.arange(self.n) if rows is None else row_numbers(rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"row numbers out of range for {self.path} ({self.n} rows)")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        with self._file() as f:
            ds = f["features"]
            for lo in range(0, len(rows), block_rows):
                want = sorted_rows[lo:lo + block_rows]
                first, last = int(want[0]), int(want[-1]) + 1
                if last - first <= 2 * block_rows:  # dense enough: one contiguous read, then select
                    block = ds[first:last][want - first]
                else:  # sparse: read only the wanted rows (h5py needs them increasing and unique)
                    unique, back = np.unique(want, return_inverse=True)
                    block = ds[unique][back]
                check_values(block, self.path, InputFileError)
                yield order[lo:lo + block_rows], block.astype(dtype, copy=False)

    def _file(self) -> h5py.File:
        f = h5py.File(self.path, "r", locking=False)
        if self.generation is not None and file_generation(f) != self.generation:
            f.close()
            raise InputFileError(f"{display_path(self.path)} was replaced or changed since it was opened (by another "
                                 "extraction?): its rows no longer match the labels read then; open it again "
                                 "(read_cache) and rerun")
        return f

    def __repr__(self) -> str:
        where = "" if self.split is None else ", " + " ".join(
            f"{s} {int((self.split == s).sum())}" for s in SPLIT_NAMES if (self.split == s).any())
        return (f"Cache({self.path!r}: {self.n} rows x {self.dim}, {len(self.classes)} classes, "
                f"backbone {self.provenance.get('backbone')}{where})")


class ArrayCache(Cache):
    """The same interface over arrays in memory: features (N, D), labels (N,), optional splits."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, classes: list[str], split=None,
                 paths: list[str] | None = None, provenance: dict | None = None):
        features = np.asarray(features)
        if features.ndim != 2:
            raise SettingError(f"features must be a 2-D array (N, D); got shape {features.shape}")
        labels = integer_labels(labels, "the arrays", SettingError)
        split = None if split is None else np.asarray(list(split), dtype=object)
        check_rows(len(features), labels, list(classes), split, "the arrays", SettingError)
        meta = {"backbone": "arrays", "layer": "arrays", "dim": int(features.shape[1]), **(provenance or {})}
        super().__init__(None, meta, list(classes), labels, split)
        self._features = features
        self.__dict__["paths"] = list(paths) if paths is not None else [f"row{i:08d}" for i in range(len(labels))]
        self.__dict__["path_bytes"] = [os.fsencode(p) for p in self.paths]
        self.__dict__["failed"] = []
        self.__dict__["columns"] = {}

    def blocks(self, rows=None, block_rows=4096, dtype=np.float32):
        rows = np.arange(self.n) if rows is None else row_numbers(rows)
        for lo in range(0, len(rows), block_rows):
            block = self._features[rows[lo:lo + block_rows]]
            check_values(block, None, InputFileError)
            yield np.arange(lo, min(lo + block_rows, len(rows))), block.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"ArrayCache({self.n} rows x {self.dim}, {len(self.classes)} classes)"


def check_values(block: np.ndarray, path: str | None, error=InputFileError) -> None:
    """Features must be finite and at most FEATURE_LIMIT in magnitude; path None: arrays in memory."""
    where = f"{display_path(path)} holds" if path else "the features hold"
    if not np.isfinite(block).all():
        raise error(f"{where} non-finite features (NaN or inf)" + ("; re-extract it at fp32" if path else ""))
    largest = float(np.abs(block).max()) if block.size else 0.0
    if largest > FEATURE_LIMIT:
        raise error(f"{where} features of magnitude {largest:.3g}, over the {FEATURE_LIMIT:.0e} the fitting arithmetic "
                    "survives (their squares overflow); rescale them" + (", or re-extract it" if path else ""))


def integer_labels(labels, where: str, error=SettingError) -> np.ndarray:
    """Labels as (N,) int64, refusing what is not integers (0.7 is no class index: never truncated)."""
    array = np.asarray(labels)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise error(f"labels of {where} must be integers (indices into classes); found {array.dtype} "
                    f"values such as {array.reshape(-1)[0].item()!r}")
    return array.astype(np.int64)


def row_numbers(rows) -> np.ndarray:
    """Row numbers as (n,) int64, refusing what is not integers (row 1.5 is no row: never truncated)."""
    array = np.asarray(rows)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise SettingError(f"row numbers must be integers; found {array.dtype} values such as {array.reshape(-1)[0].item()!r}")
    return array.astype(np.int64).reshape(-1)


def file_generation(f: h5py.File) -> tuple:
    """Which file an open HDF5 file is: (st_dev, st_ino, st_size, st_mtime_ns) of its descriptor."""
    st = os.fstat(f.id.get_vfd_handle())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_classes(classes, where: str, error=InputFileError) -> None:
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise error(f"classes of {where} must be a non-empty list of names; found {str(classes)[:60]!r}")
    if len(set(classes)) != len(classes):
        raise error(f"classes of {where} repeat a name: {classes}")


def check_rows(n: int, labels: np.ndarray, classes: list, split, where: str, error=InputFileError) -> None:
    """The per-row arrays agree with each other and with `classes`; `error` is raised otherwise."""
    check_classes(classes, where, error)
    if labels.shape != (n,):
        raise error(f"labels of {where} have shape {labels.shape}; expected ({n},), one per feature row")
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise error(f"labels of {where} must be in 0..{len(classes) - 1} (one per class); found {bad}")
    if split is not None:
        if len(split) != n:
            raise error(f"split of {where} has {len(split)} entries; expected {n}, one per row")
        unknown = sorted(set(np.unique(split).tolist()) - set(SPLIT_NAMES))
        if unknown:
            raise error(f"split of {where} has unknown names {unknown}; expected train, val, test")


def read_cache(path: str | os.PathLike) -> Cache:
    """Open a finished cache, or raise one line saying why `path` is not one."""
    path = os.fspath(path)
    meta = check_cache(path)
    with h5py.File(path, "r", locking=False) as f:
        generation = file_generation(f)
        n, dim = f["features"].shape
        labels = f["labels"][...].astype(np.int64)
        split = f["split"].asstr()[...].astype(object) if "split" in f else None
        columns = meta.get("extra_columns") or []
        bad_columns = [c for c in columns if f"columns/{c}" not in f or f[f"columns/{c}"].shape != (n,)]
    if not isinstance(columns, list) or bad_columns:
        raise InputFileError(f"{path} is damaged: attribute 'extra_columns' names {(bad_columns or [columns])[0]!r}, "
                             f"which is not a dataset columns/NAME of {n} rows")
    classes = meta.get("classes")
    if not isinstance(classes, list):
        raise InputFileError(f"{path} is damaged: attribute 'classes' must be a JSON list of names, "
                             f"found {str(classes)[:60]!r}")
    check_rows(n, labels, classes, split, path)
    if meta.get("dim") != dim:
        raise InputFileError(f"{path} is damaged: attribute 'dim' is {meta.get('dim')!r} but features have {dim} columns")
    return Cache(path, meta, list(classes), labels, split, generation)


def check_cache(path: str) -> dict:
    """Return a finished cache's attributes; raise a one-line error for anything else."""
    if not os.path.exists(path):
        parts = [partial_path(path)] if os.path.exists(partial_path(path)) else existing_shards(path)
        if parts:
            meta = PartialCache.read_meta(parts[0])
            progress = [_partial_progress(p) for p in parts]
            raise IncompleteCacheError(incomplete_message(path, meta, Progress(
                sum(p.total for p in progress), sum(p.done for p in progress), sum(p.failed for p in progress))))
        raise InputFileError(f"no feature cache at {display_path(path)}; create one with "
                             f"`transfer extract IMAGE_DIR --out {display_path(path)}`")
    shown = display_path(path)
    if os.path.isdir(path):
        raise InputFileError(f"{shown} is a folder; expected a feature cache file (.h5) written by `transfer extract`")
    if not_a_file(path):
        raise InputFileError(f"{shown} {not_a_file(path)}; expected a feature cache file (.h5) written by `transfer extract`")
    if not h5py.is_hdf5(path):
        raise InputFileError(f"{shown} is not a feature cache (not an HDF5 file); expected the output of "
                             "`transfer extract`")
    try:
        with h5py.File(path, "r", locking=False) as f:
            meta = read_attrs(f)
            datasets = set(f.keys())
    except OSError as e:
        raise InputFileError(f"cannot read {shown}: {e}") from None
    if meta.get("format") != FORMAT:
        raise InputFileError(f"{shown} is an HDF5 file but not a transfer feature cache "
                             f"(no format={FORMAT!r} attribute)")
    version = meta.get("format_version", 0)
    if not isinstance(version, int):
        raise InputFileError(f"{shown} is damaged: attribute 'format_version' is {version!r}, expected a number")
    if version > FORMAT_VERSION:
        raise InputFileError(f"{shown} has cache format version {version}; this transfer reads up to "
                             f"{FORMAT_VERSION}: upgrade transfer")
    if meta.get("state") != "complete":
        raise IncompleteCacheError(incomplete_message(path, meta, _partial_progress(path)))
    missing = {"features", "labels", "paths"} - datasets
    if missing:
        raise InputFileError(f"{shown} is damaged: missing datasets {', '.join(sorted(missing))}")
    return meta


def _partial_progress(path: str) -> Progress:
    try:
        return PartialCache(path).progress()
    except (OSError, KeyError):
        raise InputFileError(f"{display_path(path)} is not a finished cache and is damaged (no readable "
                             "progress); extract it again") from None


def incomplete_message(path: str, meta: dict, progress: Progress) -> str:
    command = meta.get("command") or "transfer extract IMAGE_DIR --out " + display_path(path)
    world = int(meta.get("world_size") or 1)
    how = f"torchrun again with {world} processes in all, each running: {command}" if world > 1 else command
    return (f"{display_path(path)} is incomplete: extraction stopped at {progress.finished} of {progress.total} "
            f"images; resume it with: {how}")

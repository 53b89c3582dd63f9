"""What a cache file already holds per file: the results an update can reuse.

A finished cache (its rows and its `failed` group) or an unfinished partial file (its committed
rows) is read into `Entries`: one per file it has a result for, keyed by the path relative to the
image folder, with the file's size, mtime and content hash as they were when it was listed. The
update logic (`pipeline.extraction.update`) decides which entries a new listing reuses; `Prefill` is that
decision, which `PartialCache.create` copies into the new partial file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from .format import COPY_ROWS, DONE, FAILED, read_attrs, runs


@dataclass
class Entries:
    """M files of one cache or partial file. keys: path bytes relative to the image folder;
    labels / splits: class name and split name (None) per entry ("" for a finished cache's failed
    files, which keep no label); sizes, mtime_ns: (M,) int64, -1 where unknown; hashes: (M,) hex
    sha256 or ""; feature_rows: (M,) int64 row of the file's `features`, -1 for a failed file;
    reasons: why a failed file failed ("" otherwise)."""

    path: str
    kind: str  # "cache" or "partial"
    keys: list[bytes]
    labels: list[str]
    splits: list[str | None]
    sizes: np.ndarray
    mtime_ns: np.ndarray
    hashes: np.ndarray
    feature_rows: np.ndarray
    reasons: list[str]
    has_stats: bool  # False for files written before transfer recorded size and mtime
    has_hashes: bool
    attrs: dict = field(default_factory=dict)  # the file's attributes (provenance)

    def __len__(self) -> int:
        return len(self.keys)


def cache_entries(path: str) -> Entries:
    """Every file a finished cache has a result for: its rows, then its failed files."""
    with h5py.File(path, "r", locking=False) as f:
        attrs = read_attrs(f)
        classes = attrs["classes"]
        n = f["features"].shape[0]
        has_stats = "sizes" in f and "sizes" in f.get("failed", {})
        has_hashes = "content_hash" in f and "content_hash" in f.get("failed", {})
        failed = f["failed"] if "failed" in f else {}
        n_failed = len(failed["path_bytes"]) if "path_bytes" in failed else 0
        labels = [classes[i] for i in f["labels"][...]] + [""] * n_failed
        split = list(f["split"].asstr()[...]) if "split" in f else [None] * n
        keys = _keys(f) + (list(failed["path_bytes"][...]) if n_failed else [])
        sizes, mtimes, hashes = _stats(f, has_stats, has_hashes, n)
        if n_failed:
            fs, fm, fh = _stats(failed, has_stats, has_hashes, n_failed)
            sizes, mtimes, hashes = np.concatenate([sizes, fs]), np.concatenate([mtimes, fm]), np.concatenate([hashes, fh])
        reasons = [""] * n + (list(failed["reasons"].asstr()[...]) if n_failed else [])
    rows = np.concatenate([np.arange(n, dtype=np.int64), np.full(n_failed, -1, dtype=np.int64)])
    return Entries(path, "cache", keys, labels, split + [None] * n_failed, sizes, mtimes, hashes, rows, reasons,
                   has_stats, has_hashes, attrs)


def partial_entries(path: str) -> Entries:
    """Every committed row of a partial file (done or failed); pending rows are not results yet."""
    with h5py.File(path, "r", locking=False) as f:
        attrs = read_attrs(f)
        classes = attrs["classes"]
        status = f["status"][...]
        rows = np.flatnonzero((status == DONE) | (status == FAILED))
        has_stats, has_hashes = "sizes" in f, "content_hash" in f
        sizes, mtimes, hashes = _stats(f, has_stats, has_hashes, len(status))
        labels = f["labels"][...]
        split = list(f["split"].asstr()[...]) if "split" in f else [None] * len(status)
        keys = _keys(f)
        bad = np.flatnonzero(status == FAILED)
        reasons = dict(zip(bad.tolist(), f["reasons"][bad] if len(bad) else []))
    done = status[rows] == DONE
    return Entries(path, "partial", [keys[i] for i in rows], [classes[labels[i]] for i in rows],
                   [split[i] for i in rows], sizes[rows], mtimes[rows], hashes[rows],
                   np.where(done, rows, -1).astype(np.int64),
                   ["" if d else reasons[int(i)].decode("utf-8", "replace") for i, d in zip(rows, done)],
                   has_stats, has_hashes, attrs)


def _keys(f) -> list[bytes]:
    if "path_bytes" in f:
        return list(f["path_bytes"][...])
    return [p.encode("utf-8", "surrogateescape") for p in f["paths"].asstr()[...]]


def _stats(group, has_stats: bool, has_hashes: bool, n: int):
    sizes = group["sizes"][...] if has_stats else np.full(n, -1, dtype=np.int64)
    mtimes = group["mtime_ns"][...] if has_stats else np.full(n, -1, dtype=np.int64)
    hashes = np.empty(n, dtype=object)
    hashes[:] = [h.decode("ascii") for h in group["content_hash"][...]] if has_hashes else [""] * n
    return sizes.astype(np.int64), mtimes.astype(np.int64), hashes


@dataclass
class Prefill:
    """Results a new partial file starts with: `copies` of features, (file, rows (k,) of the new
    partial, feature rows (k,) of that file); `failed` (row, reason) taken over as they were;
    `hashes` row -> content hash known before any file is read. `counts` is the update's account."""

    copies: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(len(rows) for _, rows, _ in self.copies) + len(self.failed)


def copy_features(src: h5py.Dataset, src_rows: np.ndarray, dst: h5py.Dataset, dst_rows: np.ndarray) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]], COPY_ROWS rows at a time (memory O(COPY_ROWS x D))."""
    order = np.argsort(dst_rows, kind="stable")
    dst_rows, src_rows = dst_rows[order], src_rows[order]
    for lo in range(0, len(dst_rows), COPY_ROWS):
        want = src_rows[lo:lo + COPY_ROWS]
        first, last = int(want.min()), int(want.max()) + 1
        if last - first <= 2 * len(want):  # dense (a grown folder keeps its order): one contiguous read
            block = src[first:last][want - first]
        else:
            unique, back = np.unique(want, return_inverse=True)
            block = src[unique][back]
        for a, b, sel in runs(dst_rows[lo:lo + COPY_ROWS]):
            dst[a:b] = block[sel]

"""Several caches of one extraction as one: `merge_caches` writes it, `PartsCache` reads it in place.

Parts come from anywhere: engine workers (`write_cache` with an `Embedder`'s provenance), caches
of subsets extracted apart, torchrun jobs. They must agree on everything that decides a feature
(`format.IDENTITY_KEYS` but the listing: backbone, weights, layer, preprocessing, precision,
versions, ...), on the image folder their paths are relative to, on whether rows have a split
and on a manifest's columns; a file may appear in one part only. The result holds every row in
the order `extract` lists images (split, class name bytes, path bytes: `images.scan_image_folder`
and `extraction.manifest`), classes are the union (sorted by bytes), labels are renumbered and
the listing digest is recomputed, so merging the parts of an extraction gives the cache a single
extraction of the same files writes: the same rows, labels, splits, failures and provenance.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from functools import cached_property

import h5py
import numpy as np

from ..errors import IncompatibleCachesError, InputFileError, SettingError, TransferError
from ..files import display_path, make_folder_for, remove_quietly, remove_stale_temporaries, temporary_name
from ..progress import resolve
from .format import (BYTES, COPY_ROWS, FORMAT, FORMAT_VERSION, STR, ListingDigest, describe_difference, identity,
                     objects, os_reason, quiet_h5py_teardown, write_attrs)
from .reader import SPLIT_NAMES, Cache, read_cache

PER_FILE = ("sizes", "mtime_ns", "content_hash")  # kept when every part records them
# Attributes that describe one part's run, not the merged rows.
PART_ONLY = ("num_images", "num_failed", "num_listed", "assembled", "state", "world_size", "merged_from")


@dataclass
class MergePlan:
    """Where each row of the merged cache comes from. Rows (n,): part, local row, label, split,
    path bytes; failed (m,): the same for the files that could not be used (local row = index in
    the part's `failed` group), with reasons."""

    parts: list[Cache]
    meta: dict
    classes: list[str]
    part: np.ndarray
    local: np.ndarray
    labels: np.ndarray
    split: np.ndarray | None
    path_bytes: list[bytes]
    failed: dict  # part, local, labels, split, path_bytes, reasons
    per_file: list[str]
    columns: list[str]

    @property
    def n(self) -> int:
        return len(self.labels)


def plan_merge(paths: list[str]) -> MergePlan:
    """Check the parts agree (one line naming the first disagreement) and put their rows in order."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise SettingError("merge: no parts given; expected one or more cache files")
    seen = {}
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            raise SettingError(f"merge: {display_path(p)} is given twice")
        seen[key] = p
    parts = [read_cache(p) for p in paths]
    first = parts[0]
    for other in parts[1:]:
        _check_same(first, other)
    with_split = first.split is not None
    columns = list(first.provenance.get("extra_columns") or [])
    entries = []  # (split rank, class bytes, path bytes, kind 0 row / 1 failed, part, local, class, split, reason)
    per_file = [name for name in PER_FILE if all(_has(c, name) for c in parts)]
    for k, c in enumerate(parts):
        split = c.split if with_split else [None] * c.n
        for i, (raw, label) in enumerate(zip(c.path_bytes, c.labels.tolist())):
            entries.append((bytes(raw), 0, k, i, c.classes[label], split[i], ""))
        for i, (raw, label, s, reason) in enumerate(_failed_rows(c, with_split)):
            entries.append((raw, 1, k, i, label, s, reason))
    classes = sorted({c for cache in parts for c in cache.classes}, key=os.fsencode)
    rank = {s: i for i, s in enumerate(SPLIT_NAMES)}
    entries.sort(key=lambda e: (rank.get(e[5], 0), os.fsencode(e[4] or ""), e[0]))
    _check_unique(entries, parts)
    index = {c: i for i, c in enumerate(classes)}
    digest = ListingDigest(classes)
    digest.update([os.fsdecode(e[0]) for e in entries], [index.get(e[4], -1) for e in entries],
                  [e[5] for e in entries] if with_split else None)
    good = [e for e in entries if e[1] == 0]
    bad = [e for e in entries if e[1] == 1]
    meta = {k: v for k, v in first.provenance.items() if k not in PART_ONLY}
    meta.update(classes=classes, listing_sha256=digest.hexdigest() if not columns else _with_columns(digest, entries,
                                                                                                    parts, columns),
                num_listed=len(entries), merged_from=[display_path(os.path.basename(p)) for p in paths])
    if any(e[4] is None for e in bad):
        meta["merge_note"] = "some failed files had no recorded label (parts written before transfer kept them)"
    failed = {"part": np.array([e[2] for e in bad], dtype=np.int64), "local": np.array([e[3] for e in bad], np.int64),
              "labels": np.array([index.get(e[4], -1) for e in bad], dtype=np.int64),
              "split": [e[5] for e in bad], "path_bytes": [e[0] for e in bad], "reasons": [e[6] for e in bad]}
    return MergePlan(parts, meta, classes, np.array([e[2] for e in good], dtype=np.int64),
                     np.array([e[3] for e in good], dtype=np.int64),
                     np.array([index[e[4]] for e in good], dtype=np.int64),
                     np.array([e[5] for e in good], dtype=object) if with_split else None,
                     [e[0] for e in good], failed, per_file, columns)


def _check_same(first: Cache, other: Cache) -> None:
    a, b = first.provenance, other.provenance
    ignoring = ("listing_sha256",)
    if identity(a, ignoring) != identity(b, ignoring):
        shown = describe_difference({**a, "listing_sha256": ""}, {**b, "listing_sha256": ""})
        raise IncompatibleCachesError(f"cannot merge {display_path(other.path)} with {display_path(first.path)}: "
                                      f"they were extracted differently ({shown})")
    if (first.image_dir or "") != (other.image_dir or ""):
        raise IncompatibleCachesError(
            f"cannot merge {display_path(other.path)} with {display_path(first.path)}: their paths are relative to "
            f"different image folders ({display_path(other.image_dir or '?')} vs {display_path(first.image_dir or '?')})")
    if (first.split is None) != (other.split is None):
        has, lacks = (first, other) if first.split is not None else (other, first)
        raise IncompatibleCachesError(f"cannot merge: {display_path(has.path)} has train/val/test splits and "
                                      f"{display_path(lacks.path)} has none")
    if (a.get("extra_columns") or []) != (b.get("extra_columns") or []):
        raise IncompatibleCachesError(f"cannot merge {display_path(other.path)} with {display_path(first.path)}: "
                                      f"other manifest columns ({b.get('extra_columns')} vs {a.get('extra_columns')})")


def _has(cache: Cache, name: str) -> bool:
    with h5py.File(cache.path, "r", locking=False) as f:
        return name in f and name in f.get("failed", {})


def _failed_rows(cache: Cache, with_split: bool) -> list[tuple[bytes, str | None, str | None, str]]:
    """(path bytes, class name or None, split or None, reason) of each failed file of a cache."""
    with h5py.File(cache.path, "r", locking=False) as f:
        g = f.get("failed")
        if g is None or "path_bytes" not in g or len(g["path_bytes"]) == 0:
            return []
        raw = list(g["path_bytes"][...])
        labels = g["labels"][...].tolist() if "labels" in g else [-1] * len(raw)
        split = list(g["split"].asstr()[...]) if with_split and "split" in g else [None] * len(raw)
        reasons = list(g["reasons"].asstr()[...])
    names = [cache.classes[y] if 0 <= y < len(cache.classes) else None for y in labels]
    return list(zip(raw, names, split, reasons))


def _check_unique(entries: list, parts: list[Cache]) -> None:
    first = {}
    for e in entries:
        other = first.setdefault(e[0], e)
        if other is not e:
            where = sorted({display_path(parts[other[2]].path), display_path(parts[e[2]].path)})
            raise IncompatibleCachesError(f"cannot merge: {display_path(e[0])} is in {' and '.join(where)}"
                                          f"{' twice' if len(where) == 1 else ''}; parts must hold disjoint files")


def _with_columns(digest: ListingDigest, entries: list, parts: list[Cache], columns: list[str]) -> str:
    """The listing digest of a manifest's cache: its extra columns, in listing order, count too."""
    values = {name: [] for name in columns}
    failed_columns = {}
    for e in entries:
        cache = parts[e[2]]
        for name in columns:
            if e[1] == 0:
                values[name].append(str(cache.columns[name][e[3]]))
            else:
                if (e[2], name) not in failed_columns:
                    with h5py.File(cache.path, "r", locking=False) as f:
                        ds = f.get(f"failed/columns/{name}")
                        failed_columns[e[2], name] = list(ds.asstr()[...]) if ds is not None else None
                found = failed_columns[e[2], name]
                values[name].append("" if found is None else found[e[3]])
    digest._sha.update(json.dumps(values).encode())
    return digest.hexdigest()


def merge_caches(parts, out: str | os.PathLike, *, overwrite: bool = False, progress="auto") -> Cache:
    """Join finished caches of one extraction (written by any engine, or by `extract`) into one
    cache at `out`, in `extract`'s row order; refuses parts extracted differently, of different
    image folders, or sharing a file. `out` appears only when complete. Returns it opened.

    >>> merged = merge_caches(sorted(glob.glob("parts/*.h5")), "cache/photos.h5")
    """
    out = os.fspath(out)
    plan = plan_merge(parts)
    if os.path.isdir(out):
        raise InputFileError(f"--out {display_path(out)} is a folder; expected a cache file name such as "
                             f"{display_path(os.path.join(out, 'features.h5'))}")
    if any(os.path.exists(out) and os.path.samefile(out, c.path) for c in plan.parts):
        raise SettingError(f"--out {display_path(out)} is one of the parts; write the merged cache elsewhere")
    if os.path.exists(out) and not overwrite:
        raise InputFileError(f"{display_path(out)} already exists; pass --overwrite to replace it")
    make_folder_for(out)
    remove_stale_temporaries(out)
    tmp = temporary_name(out)
    sink = resolve(progress)
    try:
        with quiet_h5py_teardown():
            with h5py.File(tmp, "w") as f:
                _write(f, plan, sink)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        remove_quietly(tmp)
        raise TransferError(f"writing {display_path(out)} failed ({os_reason(e)}); the parts are untouched") from None
    except BaseException:
        remove_quietly(tmp)
        raise
    finally:
        sink.close()
    return read_cache(out)


def _write(f: h5py.File, plan: MergePlan, sink) -> None:
    dim = int(plan.meta["dim"])
    chunk_rows = max(1, min(max(plan.n, 1), (1 << 20) // (4 * dim)))
    features = f.create_dataset("features", (plan.n, dim), np.float32, chunks=(chunk_rows, dim) if plan.n else None)
    sink.phase("merge", plan.n, "row")
    for lo in range(0, plan.n, COPY_ROWS):
        hi = min(lo + COPY_ROWS, plan.n)
        features[lo:hi] = gather(plan, np.arange(lo, hi))
        sink.advance(hi - lo)
    bad = plan.failed
    f.create_dataset("labels", data=plan.labels)
    f.create_dataset("paths", data=objects(display_path(p) for p in plan.path_bytes), dtype=STR)
    f.create_dataset("path_bytes", data=objects(plan.path_bytes), dtype=BYTES)
    g = f.create_group("failed")
    g.create_dataset("paths", data=objects(display_path(p) for p in bad["path_bytes"]), dtype=STR)
    g.create_dataset("path_bytes", data=objects(bad["path_bytes"]), dtype=BYTES)
    g.create_dataset("reasons", data=objects(bad["reasons"]), dtype=STR)
    g.create_dataset("labels", data=bad["labels"])
    if plan.split is not None:
        f.create_dataset("split", data=objects(plan.split), dtype=STR)
        g.create_dataset("split", data=objects(bad["split"]), dtype=STR)
    for name in plan.per_file + [f"columns/{c}" for c in plan.columns]:
        good_values = _per_row(plan, name, plan.part, plan.local, "")
        bad_values = _per_row(plan, name, bad["part"], bad["local"], "failed/")
        kind = {} if name in ("sizes", "mtime_ns", "content_hash") else {"dtype": STR}
        f.create_dataset(name, data=good_values if not kind else objects(good_values), **kind)
        g.create_dataset(name, data=bad_values if not kind else objects(bad_values), **kind)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_attrs(f, {**plan.meta, "format": FORMAT, "format_version": FORMAT_VERSION, "state": "complete",
                    "num_images": plan.n, "num_failed": len(bad["labels"]), "assembled": now})


def _per_row(plan: MergePlan, name: str, part: np.ndarray, local: np.ndarray, prefix: str):
    """Dataset `prefix + name` of every part, picked row by row (part[i], local[i])."""
    loaded = []
    for c in plan.parts:
        with h5py.File(c.path, "r", locking=False) as f:
            ds = f.get(prefix + name)
            if ds is None:  # failed/columns/NAME of a cache written before transfer kept them
                loaded.append(np.full(int(local.max(initial=-1)) + 1, "", dtype=object))
            else:
                loaded.append(ds.asstr()[...].astype(object) if name.startswith("columns/") else ds[...])
    if not len(part):
        return np.zeros(0, dtype=loaded[0].dtype)
    return np.concatenate([loaded[k][local[part == k]] for k in range(len(plan.parts))])[_inverse(part)]


def _inverse(part: np.ndarray) -> np.ndarray:
    """Rows grouped by part (as `np.concatenate` over parts gives them) -> the original order."""
    order = np.argsort(part, kind="stable")
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return back


def gather(plan: MergePlan, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Features (len(rows), D) of merged rows `rows`, read part by part in block reads."""
    out = np.empty((len(rows), int(plan.meta["dim"])), dtype=dtype)
    part, local = plan.part[rows], plan.local[rows]
    for k in np.unique(part).tolist():
        sel = np.flatnonzero(part == k)
        out[sel] = plan.parts[k].features(local[sel], dtype=dtype)
    return out


class PartsCache(Cache):
    """Several caches of one extraction read as one (`fit part-*.h5`), without writing a merged
    file: the rows, classes, labels and splits `merge_caches` would write, features read from the
    parts block by block. `path` is the first part; `parts` all of them."""

    def __init__(self, paths):
        self.plan = plan_merge(paths)
        self.parts = [c.path for c in self.plan.parts]
        meta = {**self.plan.meta, "num_images": self.plan.n, "num_failed": len(self.plan.failed["labels"]),
                "state": "complete"}
        super().__init__(self.parts[0], meta, self.plan.classes, self.plan.labels, self.plan.split)

    @cached_property
    def paths(self) -> list[str]:
        return [os.fsdecode(p) for p in self.plan.path_bytes]

    @cached_property
    def path_bytes(self) -> list[bytes]:
        return list(self.plan.path_bytes)

    @cached_property
    def failed(self) -> list[tuple[str, str]]:
        return [(display_path(p), r) for p, r in zip(self.plan.failed["path_bytes"], self.plan.failed["reasons"])]

    @cached_property
    def columns(self) -> dict[str, np.ndarray]:
        return {c: _per_row(self.plan, f"columns/{c}", self.plan.part, self.plan.local, "")
                for c in self.plan.columns}

    def blocks(self, rows=None, block_rows: int = 4096, dtype=np.float32):
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"row numbers out of range for the {len(self.parts)} parts ({self.n} rows)")
        for lo in range(0, len(rows), block_rows):
            yield np.arange(lo, min(lo + block_rows, len(rows))), gather(self.plan, rows[lo:lo + block_rows], dtype)

    def __repr__(self) -> str:
        return f"PartsCache({len(self.parts)} parts: {self.n} rows x {self.dim}, {len(self.classes)} classes)"


def open_caches(paths) -> Cache:
    """One cache path -> `read_cache`; several -> a `PartsCache` over them."""
    if isinstance(paths, (str, os.PathLike)):
        return read_cache(paths)
    paths = [os.fspath(p) for p in paths]
    return read_cache(paths[0]) if len(paths) == 1 else PartsCache(paths)

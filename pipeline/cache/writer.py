"""Writing a complete cache from arrays: features computed elsewhere, synthetic data, tests.

`write_cache` takes an (N, D) array, or a stream of blocks written one at a time (constant memory,
so a cache larger than memory can be made). The file is written under a temporary name and
renamed when complete, like every cache `extract` writes.
"""

from __future__ import annotations

import datetime
import itertools
import os
from typing import Iterable

import h5py
import numpy as np

from ..errors import InputFileError, SettingError, TransferError
from ..files import display_path, make_folder_for, remove_quietly, remove_stale_temporaries, temporary_name
from .format import (BYTES, DEFAULT_PROVENANCE, FORMAT, FORMAT_VERSION, STR, ListingDigest, objects, os_reason,
                     quiet_h5py_teardown, write_attrs)
from ..images import short_reason
from .reader import Cache, check_classes, check_rows, check_values, integer_labels, read_cache

CHUNK_BYTES = 1 << 20  # ~1 MiB feature chunks, as `extract` writes them


def write_cache(path: str | os.PathLike, features, labels=None, *, classes: list[str], split=None,
                paths: list[str] | None = None, provenance: dict | None = None, overwrite: bool = False,
                failed=None) -> Cache:
    """Write a complete, valid feature cache and return it opened.

    features: (N, D) array with labels (N,) int (an index into `classes`) and optional split (N,)
    of "train"/"val"/"test"; or, with labels=None, an iterable of (features (b, D), labels (b,)) or
    (features, labels, split) blocks, written as they come. paths: N names relative to the image
    folder (default row00000000, ...). provenance: attributes to record (backbone, weights, layer,
    preprocessing, image_dir, ...); what is not given is recorded as unknown. failed (arrays only):
    (N,) reasons, "" for a row with features: the other rows go to the cache's `failed` group with
    their path, label and split, as `extract` records images it could not use (an `Embedder`'s
    "error" column; their feature rows are ignored).

    >>> write_cache("cache/mine.h5", X, y, classes=["cat", "dog"], split=["train"] * len(y))
    """
    path = os.fspath(path)
    classes = list(classes)
    check_classes(classes, "write_cache", SettingError)
    bad = None
    if isinstance(features, np.ndarray) or labels is not None:
        if labels is None:
            raise SettingError("write_cache: labels (N,) are required with a features array")
        if failed is not None:
            features, labels, split, paths, bad = _separate_failed(features, labels, split, paths, failed)
        blocks: Iterable = [(features, labels) if split is None else (features, labels, split)]
    elif failed is not None:
        raise SettingError("write_cache: failed= needs arrays (features, labels), not a stream of blocks")
    elif split is not None:
        raise SettingError("write_cache: with blocks, give each block's split inside it: (features, labels, split)")
    else:
        blocks = features
    if os.path.isdir(path):
        raise InputFileError(f"{display_path(path)} is a folder; expected a cache file name such as "
                             f"{display_path(os.path.join(path, 'features.h5'))}")
    if os.path.exists(path) and not overwrite:
        raise InputFileError(f"{display_path(path)} already exists; pass overwrite=True to replace it")
    make_folder_for(path)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        with quiet_h5py_teardown():
            with h5py.File(tmp, "w") as f:
                _write_blocks(f, iter(blocks), classes, paths, provenance or {}, bad)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # HDF5 reports failed writes at close as RuntimeError
        remove_quietly(tmp)
        raise TransferError(f"writing {display_path(path)} failed ({os_reason(e)})") from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return read_cache(path)


def _separate_failed(features, labels, split, paths, failed):
    """(features, labels, split, paths) of the good rows, and the failed ones: (paths, reasons,
    labels, split or None)."""
    reasons = np.asarray([str(r) for r in failed], dtype=object)
    X, y = np.asarray(features), np.asarray(labels)
    if len(reasons) != len(y) or len(X) != len(y):
        raise SettingError(f"write_cache: failed has {len(reasons)} reasons for {len(y)} labels and {len(X)} "
                           "feature rows; expected one per row (\"\" for a good row)")
    if paths is None:
        raise SettingError("write_cache: failed= needs paths= (the failed files are recorded by name)")
    if len(paths) != len(y):
        raise SettingError(f"write_cache: paths has {len(paths)} names for {len(y)} rows")
    ok = reasons == ""
    s = None if split is None else np.asarray(list(split), dtype=object)
    names = np.asarray(list(paths), dtype=object)
    bad = (list(names[~ok]), list(reasons[~ok]), y[~ok].astype(np.int64), None if s is None else list(s[~ok]))
    return X[ok], y[ok], None if s is None else list(s[ok]), list(names[ok]), bad


def _write_blocks(f: h5py.File, blocks, classes: list[str], paths, provenance: dict, bad=None) -> None:
    first = next(blocks, None)
    if first is None:
        raise SettingError("write_cache: no rows to write")
    X0 = np.asarray(first[0])
    if X0.ndim != 2 or X0.shape[1] < 1:
        raise SettingError(f"write_cache: features must be 2-D (N, D); got shape {X0.shape}")
    dim, has_split = int(X0.shape[1]), len(first) == 3
    chunk_rows = max(1, CHUNK_BYTES // (4 * dim))
    features = f.create_dataset("features", (0, dim), np.float32, maxshape=(None, dim), chunks=(chunk_rows, dim))
    columns = {"labels": np.int64, "paths": STR, "path_bytes": BYTES, **({"split": STR} if has_split else {})}
    datasets = {name: f.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(4096,))
                for name, dtype in columns.items()}
    digest = ListingDigest(classes)
    n = 0
    for i, block in enumerate(itertools.chain([first], blocks)):
        X, y, s = _check_block(block, i, dim, has_split, classes)
        b = len(y)
        names = [f"row{n + j:08d}" for j in range(b)] if paths is None else list(paths[n:n + b])
        if len(names) != b:
            raise SettingError(f"write_cache: paths has {len(paths)} names but the blocks hold more rows")
        features.resize(n + b, axis=0)
        features[n:n + b] = X
        values = {"labels": y, "paths": objects(display_path(p) for p in names),
                  "path_bytes": objects(os.fsencode(p) for p in names), "split": None if s is None else objects(s)}
        for name, ds in datasets.items():
            ds.resize(n + b, axis=0)
            ds[n:n + b] = values[name]
        digest.update(names, y, s)
        n += b
    if paths is not None and len(paths) != n:
        raise SettingError(f"write_cache: paths has {len(paths)} names for {n} rows")
    group = f.create_group("failed")
    bad_paths, reasons, bad_labels, bad_split = bad if bad is not None else ([], [], np.zeros(0, np.int64), None)
    if bad is not None:
        check_rows(len(bad_labels), bad_labels, classes, None if bad_split is None else np.asarray(bad_split, object),
                   "the failed rows", SettingError)
        digest.update(bad_paths, bad_labels, bad_split)  # not the listing's order: see cache.merge
    group.create_dataset("paths", data=objects(display_path(p) for p in bad_paths), dtype=STR)
    group.create_dataset("path_bytes", data=objects(os.fsencode(p) for p in bad_paths), dtype=BYTES)
    group.create_dataset("reasons", data=objects(short_reason(r) for r in reasons), dtype=STR)
    group.create_dataset("labels", data=np.asarray(bad_labels, dtype=np.int64))
    if has_split:
        group.create_dataset("split", data=objects(bad_split or []), dtype=STR)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    n_bad = len(bad_paths)
    write_attrs(f, {**DEFAULT_PROVENANCE, "created": now, **provenance, "classes": classes, "dim": dim,
                    "listing_sha256": digest.hexdigest(), "num_listed": n + n_bad, "num_images": n,
                    "num_failed": n_bad,
                    "format": FORMAT, "format_version": FORMAT_VERSION, "state": "complete", "assembled": now})


def _check_block(block, i: int, dim: int, has_split: bool, classes: list[str]):
    """One block, checked: X (b, D) float32, y (b,) int64, split (b,) list or None."""
    if not isinstance(block, (tuple, list)) or len(block) != (3 if has_split else 2):
        raise SettingError(f"write_cache: block {i} must be (features, labels{', split' if has_split else ''}) "
                           "like the first block")
    X = np.asarray(block[0], dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != dim:
        raise SettingError(f"write_cache: block {i} has features of shape {X.shape}; expected (b, {dim})")
    y = integer_labels(block[1], f"write_cache's block {i}")
    check_values(X, None, SettingError)
    s = None if not has_split else [str(v) for v in block[2]]
    check_rows(len(X), y.astype(np.int64), classes, None if s is None else np.asarray(s, dtype=object),
               f"block {i}", SettingError)
    return X, y.astype(np.int64), s

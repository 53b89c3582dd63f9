"""Assembling the final cache `OUT` from finished partial files (one, or one per torchrun rank).

The committed rows are streamed block by block into `OUT.assembling-PID`, which is renamed to `OUT`
at the end: a file named like a cache exists only once it is complete.
"""

from __future__ import annotations

import datetime
import os
import shutil

import h5py
import numpy as np

from ..errors import TransferError
from ..files import remove_quietly
from .format import (BYTES, COPY_ROWS, DONE, FAILED, FORMAT, FORMAT_VERSION, STR, describe_difference, identity,
                     os_reason, quiet_h5py_teardown, read_attrs, runs, write_attrs)
from .partial import remove_stale_temporaries
from .reader import Cache, read_cache


def assemble(parts: list[str], out: str, meta: dict) -> Cache:
    """Stream the committed rows of partial files (in order) into `out`; rename into place at the end.

    Nothing named `out` exists until every row has been copied.
    """
    remove_stale_temporaries(out, "assembling")
    tmp = f"{out}.assembling-{os.getpid()}"
    _check_free_space(parts, out)
    try:
        with quiet_h5py_teardown():
            with h5py.File(tmp, "w") as dst:
                _assemble_into(dst, parts, meta)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:  # HDF5 reports failed writes at close as RuntimeError
        remove_quietly(tmp)
        raise TransferError(
            f"writing {out} failed ({os_reason(e)}); the extracted features are safe in "
            f"{', '.join(parts)}: fix the cause and rerun the same command to finish"
        ) from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return read_cache(out)


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


def check_space_for_update(out: str, feature_bytes: int) -> None:
    """Before an update starts: its new partial file and then the new cache are written beside the
    previous cache, which stays whole and readable until the new one replaces it, so the free space
    must hold both new copies of the features (about `feature_bytes` each)."""
    needed = 2 * feature_bytes
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
    if needed > free:
        raise TransferError(
            f"updating {out} needs about {needed / 2**20:.1f} MB free (the new partial file and the new cache are "
            f"written beside the previous cache, which stays readable until it is replaced) but only "
            f"{free / 2**20:.1f} MB are free (no space left on device); free some space and rerun the same command"
        )


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
            if identity(read_attrs(src)) != expected:
                raise TransferError(f"cannot assemble: {part} was made with other settings "
                                    f"({describe_difference(read_attrs(src), meta)})")
        positions = np.concatenate([s["positions"][...] for s in sources])
        # Listing order: the parts' positions interleave when ranks took whole tar shards
        # (extraction.webdataset); a folder's ranks take contiguous slices (order = identity).
        order = np.argsort(positions, kind="stable")
        if "num_listed" in meta and not np.array_equal(positions[order], np.arange(int(meta["num_listed"]))):
            raise TransferError(f"cannot assemble: the shards {', '.join(parts)} do not cover the "
                                f"{meta['num_listed']} listed images exactly once")
        ok_all = np.concatenate([st == DONE for st in status])
        bad_all = np.concatenate([st == FAILED for st in status])
        # out_row[j]: where concatenated row j goes among the finished cache's rows (if done)
        out_row = np.empty(len(positions), dtype=np.int64)
        out_row[order] = np.cumsum(ok_all[order]) - 1
        dim = int(sources[0]["features"].shape[1])
        has_split = "split" in sources[0]
        # Per-file data (size, mtime, content hash; a manifest's columns) is kept when every part
        # has it: a part written before transfer recorded it has none.
        per_file = [name for name in ("sizes", "mtime_ns", "content_hash") if all(name in s for s in sources)]
        columns = [f"columns/{c}" for c in meta.get("extra_columns") or []]
        for part, src in zip(parts, sources):
            if any(c not in src for c in columns):
                raise TransferError(f"cannot assemble: {part} lacks the manifest's columns {meta['extra_columns']}")
        chunk_rows = max(1, min(n_ok, (1 << 20) // (4 * dim)))  # ~1 MiB chunks
        features = dst.create_dataset("features", (n_ok, dim), np.float32, chunks=(chunk_rows, dim) if n_ok else None)
        cols = {"labels": [], "paths": [], "path_bytes": [], "split": [], **{c: [] for c in per_file + columns}}
        failed = {"paths": [], "path_bytes": [], "reasons": [], "labels": [], "split": [],
                  **{c: [] for c in per_file + columns}}
        start = 0
        for src, st in zip(sources, status):
            ok = st == DONE
            for lo in range(0, len(st), COPY_ROWS):
                hi = min(lo + COPY_ROWS, len(st))
                sel = ok[lo:hi]
                if sel.any():
                    block = src["features"][lo:hi][sel]
                    targets = out_row[start + lo:start + hi][sel]
                    for a, b, part in runs(targets):  # one run per block unless positions interleave
                        features[a:b] = block[part]
            start += len(st)
            paths = src["paths"].asstr()[...]
            raw = src["path_bytes"][...]
            labels = src["labels"][...]
            cols["labels"].append(labels[ok])
            cols["paths"].append(paths[ok])
            cols["path_bytes"].append(raw[ok])
            bad = st == FAILED
            failed["labels"].append(labels[bad])
            if has_split:
                split = src["split"].asstr()[...]
                cols["split"].append(split[ok])
                failed["split"].append(split[bad])
            failed["paths"].append(paths[bad])
            failed["path_bytes"].append(raw[bad])
            failed["reasons"].append(np.array([r.decode("utf-8", "replace") for r in src["reasons"][...][bad]],
                                              dtype=object))
            for name in per_file:
                values = src[name][...]
                cols[name].append(values[ok])
                failed[name].append(values[bad])
            for name in columns:
                values = src[name].asstr()[...]
                cols[name].append(values[ok])
                failed[name].append(values[bad])
        # Per-row arrays in listing order: sort the concatenation by position.
        ok_order = np.argsort(positions[ok_all], kind="stable")
        bad_order = np.argsort(positions[bad_all], kind="stable")
        cols = {k: [np.concatenate(v)[ok_order]] for k, v in cols.items() if v}
        failed = {k: [np.concatenate(v)[bad_order]] for k, v in failed.items() if v}
        dst.create_dataset("labels", data=np.concatenate(cols["labels"]).astype(np.int64))
        dst.create_dataset("paths", data=np.concatenate(cols["paths"]).astype(object), dtype=STR)
        dst.create_dataset("path_bytes", data=np.concatenate(cols["path_bytes"]).astype(object), dtype=BYTES)
        if has_split:
            dst.create_dataset("split", data=np.concatenate(cols["split"]).astype(object), dtype=STR)
        group = dst.create_group("failed")
        group.create_dataset("paths", data=np.concatenate(failed["paths"]).astype(object), dtype=STR)
        group.create_dataset("path_bytes", data=np.concatenate(failed["path_bytes"]).astype(object), dtype=BYTES)
        group.create_dataset("reasons", data=np.concatenate(failed["reasons"]).astype(object), dtype=STR)
        # A failed file keeps its label and split (merge_caches rebuilds the listing from them).
        group.create_dataset("labels", data=np.concatenate(failed["labels"]).astype(np.int64))
        if has_split:
            group.create_dataset("split", data=np.concatenate(failed["split"]).astype(object), dtype=STR)
        for name in per_file:  # sizes, mtime_ns: int64; content_hash: fixed 64-byte hex
            dst.create_dataset(name, data=np.concatenate(cols[name]))
            group.create_dataset(name, data=np.concatenate(failed[name]))
        for name in columns:
            dst.create_dataset(name, data=np.concatenate(cols[name]).astype(object), dtype=STR)
            group.create_dataset(name, data=np.concatenate(failed[name]).astype(object), dtype=STR)
        write_attrs(dst, {
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

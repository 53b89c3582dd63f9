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
                     os_reason, quiet_h5py_teardown, read_attrs, write_attrs)
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
        dst.create_dataset("paths", data=np.concatenate(cols["paths"]).astype(object), dtype=STR)
        dst.create_dataset("path_bytes", data=np.concatenate(cols["path_bytes"]).astype(object), dtype=BYTES)
        if has_split:
            dst.create_dataset("split", data=np.concatenate(cols["split"]).astype(object), dtype=STR)
        group = dst.create_group("failed")
        group.create_dataset("paths", data=np.concatenate(failed["paths"]).astype(object), dtype=STR)
        group.create_dataset("path_bytes", data=np.concatenate(failed["path_bytes"]).astype(object), dtype=BYTES)
        group.create_dataset("reasons", data=np.concatenate(failed["reasons"]).astype(object), dtype=STR)
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

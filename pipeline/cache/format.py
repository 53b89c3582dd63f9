"""What a cache file is: its format constants, attributes, names and the identity of an extraction.

docs/cache-format.md is the reference for everything named here.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import sys

import h5py
import numpy as np

from ..files import display_path

FORMAT = "transfer.features"
FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
REASON_BYTES = 200
HASH_BYTES = 64  # a hex sha256 of a file's bytes ("" where unknown)
COPY_ROWS = 2048  # rows per block when streaming features between files
# Settings that make two extractions interchangeable; any difference refuses a resume or a reuse.
IDENTITY_KEYS = ("backbone", "weights", "weights_sha256", "pretrained", "seed", "layer", "dim",
                 "preprocessing", "precision", "listing_sha256", "source", "model", "versions", "tta")
# What a head records of the cache it was fitted on (head.json, metrics.json, model metadata).
HEAD_PROVENANCE_KEYS = ("backbone", "weights", "weights_source", "weights_sha256", "pretrained", "seed", "layer",
                        "dim", "preprocessing", "precision", "torch_version", "torchvision_version", "created",
                        "image_dir", "listing_sha256", "source", "model", "versions", "layer_module", "pooling", "tta",
                        "timm_version")
# What a cache written by `write_cache` records where its caller gives nothing.
DEFAULT_PROVENANCE = {"backbone": "external", "weights": "unknown", "weights_sha256": "", "pretrained": None,
                      "seed": 0, "layer": "unknown", "preprocessing": None, "precision": "unknown",
                      "image_dir": "", "command": ""}

STR = h5py.string_dtype("utf-8")
BYTES = h5py.string_dtype("ascii")  # h5py stores these bytes as they are: lossless file names


def partial_path(out: str) -> str:
    return out + ".partial"


def listing_digest(classes: list[str], paths: list[str], labels: np.ndarray, splits: list[str] | None,
                   extras: dict[str, list[str]] | None = None) -> str:
    """sha256 over everything that fixes the rows of a cache: their order, files, labels (and a
    manifest's extra columns; without them the digest is what it always was)."""
    digest = ListingDigest(classes)
    digest.update(paths, labels, splits)
    if extras:
        digest._sha.update(json.dumps(extras).encode())
    return digest.hexdigest()


class ListingDigest:
    """`listing_digest`, fed block by block (for caches written from a stream of blocks)."""

    def __init__(self, classes: list[str]):
        self._sha = hashlib.sha256(json.dumps(classes).encode())

    def update(self, paths: list[str], labels: np.ndarray, splits: list[str] | None) -> None:
        for i, p in enumerate(paths):
            self._sha.update(os.fsencode(p) + b"\0" + str(int(labels[i])).encode() + b"\0")
            self._sha.update((splits[i] if splits is not None else "").encode() + b"\n")

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def identity(meta: dict, ignoring: tuple[str, ...] = ()) -> dict:
    """The settings that decide the features (IDENTITY_KEYS but `ignoring`), comparable across a
    file round trip. ignoring=("listing_sha256",): the extraction's settings whatever its files."""
    return json.loads(json.dumps({k: meta.get(k) for k in IDENTITY_KEYS if k not in ignoring}))


def head_provenance(meta: dict) -> dict:
    """What a head records of the cache (its provenance) it was fitted on."""
    return {k: meta.get(k) for k in HEAD_PROVENANCE_KEYS}


def describe_difference(old: dict, new: dict) -> str:
    old, new = identity(old), identity(new)
    shown = []
    for k in (k for k in IDENTITY_KEYS if old.get(k) != new.get(k)):
        if k == "listing_sha256":
            shown.append("the image folder's files or labels")
        else:
            shown.append(f"{k} {_brief(old.get(k))} vs {_brief(new.get(k))}")
    return "; ".join(shown)


def _brief(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_attrs(obj, meta: dict) -> None:
    """Attributes as HDF5 can hold them: JSON for containers, "" for None, raw bytes kept as bytes."""
    for key, value in meta.items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value)
        elif value is None:
            value = ""
        elif isinstance(value, bytes):
            value = np.void(value)  # opaque: stored byte for byte, whatever the encoding
        elif isinstance(value, str):
            value = display_path(value)  # plain UTF-8 str (also drops subclasses such as TorchVersion)
        obj.attrs[key] = value


def read_attrs(obj) -> dict:
    meta = {}
    for key, value in obj.attrs.items():
        if isinstance(value, np.void):
            value = value.tobytes()
        elif isinstance(value, bytes):
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


def runs(rows: np.ndarray):
    """Split sorted row numbers into runs of consecutive rows: yields (lo, hi, index slice)."""
    if len(rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    for s, e in zip(starts, ends):
        yield int(rows[s]), int(rows[e - 1]) + 1, slice(int(s), int(e))


def objects(items) -> np.ndarray:
    """A 1-D object array: what h5py needs to write variable-length strings."""
    items = list(items)
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def os_reason(e: Exception) -> str:
    """A failed write's cause in a few words (HDF5 hides errno inside its message text)."""
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or "No space left" in str(e) or "errno = 28" in str(e):
        return "no space left on device"
    if code == errno.EFBIG or "File too large" in str(e):
        return "file too large for this file system or limit"
    if code == errno.EROFS or "Read-only file system" in str(e):
        return "read-only file system"
    return getattr(e, "strerror", None) or " ".join(str(e).split())[:200]


@contextlib.contextmanager
def quiet_h5py_teardown():
    """When a write fails, h5py also reports each object it can no longer close through
    sys.unraisablehook (a traceback on stderr); the failure itself is raised and reported once.
    Only a failed write collects garbage: a full collection costs seconds in a process holding a
    large graph (a notebook, a test worker), on every cache written."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    except BaseException:
        gc.collect()  # the failed write's h5py objects are closed now, while their reports are silenced
        raise
    finally:
        sys.unraisablehook = previous

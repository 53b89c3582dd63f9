"""Incremental re-extraction: which rows of a new listing reuse results a cache already holds.

Rows are keyed by their path relative to the image folder (the manifest's folder). A file is
*unchanged* when a previous result has the same key and the same size and st_mtime_ns (with
check_content: the same sha256 of its bytes, which the cache stores per file). An unchanged file's
features (or its failure) are reused as they are, with the label and split of the new listing:
a file whose class or split changed is *relabelled*. A file at a new path is recognised as
*moved* from an old one with the same file name, size and mtime (with check_content: the same
content hash), so moving photos between class folders costs no network run. Every other file is
*new* (its path was never seen) or *changed*, and goes through the network; previous results of
paths no longer listed, and not reused as a moved file, are *removed*.

The plan is pure bookkeeping over `cache.Entries` (read from the previous cache and from an
interrupted partial file); `cache.PartialCache.create` copies what it reuses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..cache import Entries, Prefill
from ..files import display_path
from ..images import ImageListing


@dataclass(frozen=True)
class UpdateCounts:
    """The account of an update, over the whole listing. relabelled counts reused rows whose label
    or split changed (they are part of reused); removed counts previous results whose file is no
    longer listed and that no row reuses as a moved file."""

    reused: int
    new: int
    changed: int
    removed: int
    relabelled: int

    def line(self) -> str:
        return (f"reused {self.reused:,}, new {self.new:,}, changed {self.changed:,}, removed {self.removed:,}, "
                f"relabelled {self.relabelled:,}")


@dataclass
class UpdatePlan:
    counts: UpdateCounts
    source: np.ndarray  # (N,) int: index into `sources` of the reused result, -1 to compute
    entry: np.ndarray  # (N,) int64: index into that source's entries
    moved: int  # reused rows found under another path
    notes: list[str] = field(default_factory=list)
    hashes: np.ndarray | None = None  # (N,) content hashes known before extraction ("" unknown)

    @property
    def unchanged(self) -> bool:
        """Every row reuses the result at its own path with its own label and split, nothing removed."""
        c = self.counts
        return c.new == c.changed == c.removed == c.relabelled == self.moved == 0

    def prefill(self, listing: ImageListing, sources: list[Entries], positions: np.ndarray) -> Prefill:
        """What the partial file of listing `positions` (row r = positions[r]) starts with."""
        out = Prefill()
        copies: dict[int, tuple[list[int], list[int]]] = {}
        for row, p in enumerate(positions.tolist()):
            if p in listing.failures:
                out.failed.append((row, listing.failures[p]))
                continue
            s = int(self.source[p])
            if s < 0:
                continue
            src, j = sources[s], int(self.entry[p])
            digest = self.hashes[p] if self.hashes is not None and self.hashes[p] else src.hashes[j]
            if digest:
                out.hashes[row] = digest
            if src.feature_rows[j] < 0:
                out.failed.append((row, src.reasons[j]))
            else:
                rows, from_rows = copies.setdefault(s, ([], []))
                rows.append(row)
                from_rows.append(int(src.feature_rows[j]))
        out.copies = [(sources[s].path, np.array(r, dtype=np.int64), np.array(f, dtype=np.int64))
                      for s, (r, f) in sorted(copies.items())]
        return out


def plan_update(listing: ImageListing, sources: list[Entries], check_content: bool = False,
                hashes: np.ndarray | None = None, retry_failed: bool = False) -> UpdatePlan:
    """Decide, for every row of `listing`, which previous result (if any) it reuses.

    sources: previous results, the preferred first; hashes: (N,) sha256 of every listed file,
    required with check_content (see `images.content_hashes`); retry_failed: a file that failed
    before goes through the network again even when unchanged (it counts as changed).
    """
    if check_content and hashes is None:
        raise ValueError("check_content needs the listed files' content hashes")
    n = len(listing)
    source = np.full(n, -1, dtype=np.int64)
    entry = np.full(n, -1, dtype=np.int64)
    by_path: dict[bytes, list[tuple[int, int]]] = {}
    by_content: dict[tuple, list[tuple[int, int]]] = {}
    for s, src in enumerate(sources):
        for j, key in enumerate(src.keys):
            by_path.setdefault(key, []).append((s, j))
            content = _content_key(src, j, key, check_content)
            if content is not None:
                by_content.setdefault(content, []).append((s, j))

    def unchanged(p: int, s: int, j: int) -> bool:
        src = sources[s]
        if retry_failed and src.feature_rows[j] < 0:
            return False
        if check_content:
            return src.has_hashes and bool(src.hashes[j]) and src.hashes[j] == hashes[p]
        return src.has_stats and src.sizes[j] >= 0 and (src.sizes[j], src.mtime_ns[j]) == (
            listing.sizes[p], listing.mtime_ns[p])

    new = changed = relabelled = moved = 0
    kept: set[bytes] = set()  # keys still listed, and keys whose result a row reuses
    for p in range(n):
        key = os.fsencode(listing.paths[p])
        if p in listing.failures:
            continue
        kept.add(key)
        candidates = by_path.get(key, [])
        found = next(((s, j) for s, j in candidates if unchanged(p, s, j)), None)
        if found is None:
            content = _listed_content_key(listing, p, key, check_content, hashes)
            found = next(((s, j) for s, j in by_content.get(content, []) if unchanged(p, s, j)), None)
            moved += found is not None
        if found is None:
            changed += bool(candidates)
            new += not candidates
            continue
        s, j = found
        source[p], entry[p] = found
        kept.add(sources[s].keys[j])
        src = sources[s]
        split = None if listing.splits is None else listing.splits[p]
        if src.feature_rows[j] >= 0 and (src.labels[j] != listing.classes[listing.labels[p]] or src.splits[j] != split):
            relabelled += 1
    removed = len(set(by_path) - kept)
    counts = UpdateCounts(int((source >= 0).sum()), new, changed, removed, relabelled)
    return UpdatePlan(counts, source, entry, moved, _notes(sources, check_content), hashes)


def _content_key(src: Entries, j: int, key: bytes, check_content: bool):
    if check_content:
        return ("sha256", src.hashes[j]) if src.has_hashes and src.hashes[j] else None
    if not src.has_stats or src.sizes[j] < 0:
        return None
    return (os.path.basename(key), int(src.sizes[j]), int(src.mtime_ns[j]))


def _listed_content_key(listing: ImageListing, p: int, key: bytes, check_content: bool, hashes):
    if check_content:
        return ("sha256", hashes[p]) if hashes[p] else None
    return (os.path.basename(key), int(listing.sizes[p]), int(listing.mtime_ns[p]))


def _notes(sources: list[Entries], check_content: bool) -> list[str]:
    notes = []
    for src in sources:
        if len(src) and check_content and not src.has_hashes:
            notes.append(f"{display_path(src.path)} records no content hashes (written before transfer stored "
                         "them): with --check-content its files count as changed and are extracted again, once")
        elif len(src) and not check_content and not src.has_stats:
            notes.append(f"{display_path(src.path)} records no file sizes and mtimes (written before transfer "
                         "stored them): its files count as changed and are extracted again, once")
    return notes

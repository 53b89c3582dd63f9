"""Listing images from a manifest: a CSV or JSON Lines file of `path,label[,split]` rows.

Stage 1a, like `images.scan_image_folder`, and it returns the same `ImageListing`, so everything
after the listing (splits, failures, resume, incremental update, torchrun) works unchanged.

    path,label,split,photographer
    train/cat/1.jpg,cat,train,ann
    /data/more/7.jpg,dog,val,bob

Paths are relative to the manifest's folder (which becomes the cache's image folder) or absolute
(kept relative to that folder when inside it, so a row keeps its key however it is written).
CSV needs a header naming its columns; in JSONL each line is an object with those keys. Columns
other than path, label and split are kept per row (`ImageListing.extras`, the cache's `columns/`).
Rows are put in the folder order (split, class, path bytes), so a manifest and the equivalent
folder tree give the same cache whatever order the manifest lists its rows in. A path listed
twice or a missing file is a failed row (recorded in the cache's `failed` group, with one note
each); an empty label or an unknown split name stops the listing with one line naming the line,
as does a JSONL label or path that is not text (null, true, a list; a number is taken as its
text, with a note). Labels are stripped of surrounding spaces ('ants ' is 'ants', with a note).
Bytes that are not UTF-8 are kept as the file name's own bytes (a manifest can list any name).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from ..errors import InputFileError
from ..files import display_path, not_a_file, quoted
from ..images import SPLIT_NAMES, ImageListing, is_image_name, stat_files

REQUIRED = ("path", "label")
RESERVED = ("path", "label", "split")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


def read_manifest(manifest: str | os.PathLike) -> ImageListing:
    """List the images of a .csv or .jsonl manifest (see the module docstring)."""
    manifest = os.fspath(manifest)
    shown = display_path(manifest)
    what = not_a_file(manifest)  # a FIFO is named as one (it was "does not exist"), and never opened
    if what:
        raise InputFileError(f"manifest {shown} {what}; expected a .csv or .jsonl file with columns path,label[,split]")
    suffix = os.path.splitext(manifest)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise InputFileError(f"manifest {shown} must end in .csv or .jsonl (found {suffix or 'no extension'!r})")
    try:
        # surrogateescape: a name's bytes that are not UTF-8 reach os.fsencode unchanged
        with open(manifest, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            columns, records = (_read_csv if suffix == ".csv" else _read_jsonl)(f, shown)
    except OSError as e:
        raise InputFileError(f"cannot read manifest {shown}: {e.strerror or e}") from None
    return _listing(os.path.dirname(os.path.abspath(manifest)), manifest, shown, columns, records)


def _read_csv(f, shown: str) -> tuple[list[str], list[tuple[int, dict]]]:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise InputFileError(f"manifest {shown} is empty; expected a header line path,label[,split]")
    header = [h.strip() for h in header]
    _check_header(header, shown, f"its header {','.join(header)[:80]!r}")
    records = []
    for row in reader:
        if not row or all(not cell.strip() for cell in row):
            continue
        line = reader.line_num
        if len(row) != len(header):
            raise InputFileError(f"manifest {shown} line {line}: {len(row)} fields, expected {len(header)} "
                                 f"({','.join(header)})")
        records.append((line, dict(zip(header, row))))
    return header, records


def _read_jsonl(f, shown: str) -> tuple[list[str], list[tuple[int, dict]]]:
    columns: list[str] = []
    records = []
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputFileError(f"manifest {shown} line {line} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputFileError(f"manifest {shown} line {line} is not a JSON object; expected "
                                 '{"path": ..., "label": ...}')
        if not columns:
            _check_header(list(obj), shown, f"its first object's keys {list(obj)}")
        columns += [k for k in obj if k not in columns]
        missing = [k for k in REQUIRED if k not in obj]
        if missing:
            raise InputFileError(f"manifest {shown} line {line} has no {missing[0]!r} key")
        for key in ("path", "label", "split"):
            value = obj.get(key, "")
            if not isinstance(value, str) and (key != "label" or isinstance(value, bool)
                                               or not isinstance(value, (int, float))):
                raise InputFileError(f"manifest {shown} line {line}: {key} {json.dumps(value)[:40]} is not text; "
                                     f"expected a string{' (or a number)' if key == 'label' else ''}")
        records.append((line, {**{k: v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()},
                               "_number": not isinstance(obj["label"], str)}))
    if not records:
        raise InputFileError(f"manifest {shown} is empty; expected one JSON object per line with keys path, label")
    return columns, records


def _check_header(header: list[str], shown: str, found: str) -> None:
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputFileError(f"manifest {shown} must name its columns path,label[,split] (header required); "
                             f"{found} has no {missing[0]!r}")
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise InputFileError(f"manifest {shown} names the column {repeated[0]!r} twice")
    for name in header:
        if not name or "/" in name or name.startswith("."):
            raise InputFileError(f"manifest {shown}: column name {name!r} cannot be stored; use letters, digits, _ or -")


def _listing(root: str, manifest: str, shown: str, columns: list[str], records: list[tuple[int, dict]]) -> ImageListing:
    if not records:
        raise InputFileError(f"manifest {shown} lists no images (only its header)")
    has_split = "split" in columns
    extras = [c for c in columns if c not in RESERVED]
    first_line, duplicate_of, spaced = {}, {}, {}
    for line, rec in records:
        if rec["label"] != rec["label"].strip():
            spaced.setdefault(rec["label"], line)
        rec["label"] = rec["label"].strip()
        if has_split:
            rec["split"] = rec.get("split", "").strip()
        if not rec["label"]:
            raise InputFileError(f"manifest {shown} line {line}: empty label for {quoted(rec['path'])}")
        if not rec["path"].strip():
            raise InputFileError(f"manifest {shown} line {line}: empty path")
        if has_split and rec["split"] not in SPLIT_NAMES:
            raise InputFileError(f"manifest {shown} line {line}: unknown split {quoted(rec['split'])}; "
                                 f"expected one of {', '.join(SPLIT_NAMES)}")
        key = os.fsencode(_normal(rec["path"], root))
        if key in first_line:
            duplicate_of[line] = first_line[key]  # the first line that names a file keeps it
        first_line.setdefault(key, line)
    classes = sorted({rec["label"] for _, rec in records}, key=os.fsencode)
    index = {c: i for i, c in enumerate(classes)}
    split_rank = {s: i for i, s in enumerate(SPLIT_NAMES)}
    # The folder order: split, class, path bytes (the manifest line breaks ties between duplicates).
    records = sorted(records, key=lambda r: (split_rank.get(r[1].get("split"), 0), os.fsencode(r[1]["label"]),
                                             os.fsencode(_normal(r[1]["path"], root)), r[0]))
    paths = [_normal(rec["path"], root) for _, rec in records]
    sizes, mtimes = stat_files(root, paths)
    failures, notes, odd = {}, [], []
    for position, ((line, rec), path) in enumerate(zip(records, paths)):
        if line in duplicate_of:
            failures[position] = f"duplicate: the manifest lists this file on line {duplicate_of[line]} too"
        elif sizes[position] < 0:
            failures[position] = "file not found (listed in the manifest)"
        if position in failures:
            notes.append((line, f"manifest line {line}: {display_path(path)}: {failures[position]}"))
        if not is_image_name(path):
            odd.append(path)
    notes = [text for _, text in sorted(notes)]
    for raw, line in sorted(spaced.items(), key=lambda item: item[1]):
        notes.append(f"manifest line {line}: label {quoted(raw)} is taken as {quoted(raw.strip())} "
                     "(surrounding spaces removed); rows with either spelling are one class")
    numbers = sorted({rec["label"] for _, rec in records if rec.pop("_number", False)})
    if numbers:
        notes.append(f"labels given as numbers are class names: {', '.join(numbers[:5])}")
    if odd:  # kept: a manifest names its files on purpose
        notes.append(f"{len(odd)} listed files have no image extension (e.g. {display_path(odd[0])}); "
                     "they are decoded like the others")
    return ImageListing(
        root=root, classes=classes, paths=paths,
        labels=np.array([index[rec["label"]] for _, rec in records], dtype=np.int64),
        splits=[rec["split"] for _, rec in records] if has_split else None, skipped=[],
        sizes=sizes, mtime_ns=mtimes, failures=failures,
        extras={c: [rec.get(c, "") for _, rec in records] for c in extras}, notes=notes, manifest=manifest)


def _normal(path: str, root: str) -> str:
    """A manifest path as the cache keys it: `a/./b.jpg`, `a/b.jpg` and ROOT/a/b.jpg are one file,
    a/b.jpg; an absolute path outside the manifest's folder stays absolute."""
    path = os.path.normpath(path)
    if os.path.isabs(path) and os.path.commonpath([path, root]) == root:
        return os.path.relpath(path, root)
    return path

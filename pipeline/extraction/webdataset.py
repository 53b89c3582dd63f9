"""Listing and reading images inside WebDataset tar shards, without unpacking them.

    transfer extract --webdataset 'shards/{000000..000099}.tar' --out cache.h5 [--label-key cls|json:FIELD]
    transfer extract --webdataset 'train=shards/train-{0..9}.tar' --webdataset 'val=shards/val-0.tar' ...

A shard is an uncompressed tar (WebDataset's and img2dataset's default). Members with the same key
(the member name up to the first dot of its last component: `train/ants/0013.jpg` and
`train/ants/0013.cls` are sample `train/ants/0013`) are one sample: its image is the first member
with an image extension, its label the text of KEY.cls (`--label-key EXT` for another member) or a
field of KEY.json (`--label-key json:FIELD`), its split likewise (`--split-key`) or the SPLIT= of
its shard list. The listing reads only tar headers and the small label members (the image bytes
are skipped by seeking), and gives an `images.ImageListing` whose paths are the image members'
names, in the folder order (split, class, path bytes): a tar packed from a folder tree gives the
same rows, labels and listing digest as that folder, and everything after the listing (resume,
failures, updates, torchrun) works as for a folder. Tar headers are parsed here (`_members`)
and members read by offset: the `webdataset` package is not needed to read tars, and leaving it
out keeps its (pipe:, URL) loaders and their shell commands away from untrusted names. Nothing is
ever written to disk from a shard: member names cannot escape anywhere.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..devices import Place
from ..errors import InputFileError, SettingError
from ..files import display_path
from ..images import (HASH_NAME, SPLIT_NAMES, DecodeError, ImageListing, decode_image_bytes, is_image_name,
                      short_reason)
from . import decode as decoding

SIDE_MEMBER_BYTES = 1 << 20  # a label or JSON member larger than this is not read
IMAGE_MEMBER_BYTES = 256 << 20  # an image member larger than this fails without being read
BRACE = re.compile(r"\{([^{}]*)\}")


def expand(spec: str) -> list[str]:
    """Brace patterns as WebDataset writes them: `a-{000..012}.tar` (zero-padded numeric ranges)
    and `{train,val}-{0..3}.tar` (alternatives), every combination, in order."""
    found = BRACE.search(spec)
    if not found:
        return [spec]
    body, head, tail = found.group(1), spec[:found.start()], spec[found.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        lo, hi = numbers.group(1), numbers.group(2)
        if int(hi) < int(lo):
            raise SettingError(f"--webdataset {spec!r}: the range {{{body}}} runs backwards")
        if int(hi) - int(lo) >= 1_000_000:
            raise SettingError(f"--webdataset {spec!r}: the range {{{body}}} names over a million shards")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise SettingError(f"--webdataset {spec!r}: {{{body}}} is neither a range {{000..099}} nor choices {{a,b}}")
    return [name for choice in choices for name in expand(head + choice + tail)]


def shard_list(specs) -> list[tuple[str, str | None]]:
    """(shard path, split from its SPLIT= prefix or None) for every shard the specs name, in order."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    shards = []
    for spec in map(os.fspath, specs):
        split, eq, rest = spec.partition("=")
        if eq and split in SPLIT_NAMES:
            shards += [(path, split) for path in expand(rest)]
        else:
            shards += [(path, None) for path in expand(spec)]
    if not shards:
        raise SettingError("--webdataset: no shards given")
    seen = set()
    for path, _ in shards:
        if os.path.realpath(path) in seen:
            raise SettingError(f"--webdataset: shard {display_path(path)} is named twice")
        seen.add(os.path.realpath(path))
        if not os.path.isfile(path):
            what = "is not a file" if os.path.exists(path) else "does not exist"
            raise InputFileError(f"--webdataset: shard {display_path(path)} {what}")
    return shards


def check_key(option: str, value: str | None) -> None:
    """--label-key / --split-key: a member extension (cls, txt) or json:FIELD."""
    if value is None:
        return
    kind, colon, name = value.partition(":")
    ok = (colon and kind == "json" and name) or (not colon and re.fullmatch(r"[A-Za-z0-9_.-]+", value))
    if not ok:
        raise SettingError(f"{option} {value!r}: expected a member extension such as cls, or json:FIELD")


@dataclass(frozen=True)
class ShardListing(ImageListing):
    """An ImageListing of tar members: shards (S,) paths; per image (N,): shard index, byte offset
    and length of its data in that shard."""

    shards: list[str] = field(default_factory=list)
    shard_of: np.ndarray = None
    offsets: np.ndarray = None
    lengths: np.ndarray = None


@dataclass
class _Sample:
    key: str
    image: "_Member | None" = None
    side: dict = field(default_factory=dict)  # extension -> the member's bytes (label, json, split)


def read_shards(specs, label_key: str = "cls", split_key: str | None = None) -> ShardListing:
    """List the samples of WebDataset shards (see the module docstring)."""
    check_key("--label-key", label_key)
    check_key("--split-key", split_key)
    shards = shard_list(specs)
    found, skipped, notes = [], [], []  # found: (split, label, name, shard index, info)
    wanted = {k.lower() for k in (label_key, split_key or "") if k and not k.startswith("json:")} | {"json"}
    for s, (path, shard_split) in enumerate(shards):
        samples, problem = _samples(path, wanted)
        if problem:
            notes.append(f"shard {display_path(path)}: {problem}; its {len(samples)} samples before that are listed")
        for sample in samples.values():
            where = f"{display_path(os.path.basename(path))}:{sample.key}"
            if sample.image is None:
                skipped.append((where, "no image member"))
                continue
            label = _field(sample, label_key)
            if not label:
                skipped.append((where, f"no label ({_describe(label_key)})"))
                continue
            split = shard_split if split_key is None else _field(sample, split_key)
            if split_key is not None and not split:
                skipped.append((where, f"no split ({_describe(split_key)})"))
                continue
            if split is not None and split not in SPLIT_NAMES:
                raise InputFileError(f"shard {display_path(path)} sample {sample.key}: unknown split {split!r}; "
                                     f"expected one of {', '.join(SPLIT_NAMES)}")
            found.append((split, label, _clean(sample.image.name), s, sample.image))
    if not found:
        raise InputFileError(f"--webdataset: the {len(shards)} shards hold no labelled images "
                             f"({skipped[0][0]}: {skipped[0][1]})" if skipped else
                             f"--webdataset: the {len(shards)} shards hold no images")
    with_split = any(item[0] is not None for item in found)
    if with_split and any(item[0] is None for item in found):
        raise InputFileError("--webdataset: some shards have a split and some do not; give every shard list "
                             "a SPLIT= or use --split-key")
    rank = {name: i for i, name in enumerate(SPLIT_NAMES)}
    found.sort(key=lambda item: (rank.get(item[0], 0), os.fsencode(item[1]), os.fsencode(item[2]), item[3]))
    classes = sorted({item[1] for item in found}, key=os.fsencode)
    index = {c: i for i, c in enumerate(classes)}
    failures, first = {}, {}
    for position, (split, _, name, s, info) in enumerate(found):
        if name in first:
            failures[position] = f"duplicate: shard {display_path(os.path.basename(shards[first[name]][0]))} holds " \
                                 "an image of this name too"
        first.setdefault(name, s)
        if info.size > IMAGE_MEMBER_BYTES:
            failures[position] = f"member of {info.size:,} bytes, over the {IMAGE_MEMBER_BYTES:,} byte limit"
    paths = [shard for shard, _ in shards]
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return ShardListing(
        root=root, classes=classes, paths=[item[2] for item in found],
        labels=np.array([index[item[1]] for item in found], dtype=np.int64),
        splits=[item[0] for item in found] if with_split else None,
        skipped=skipped, sizes=np.array([item[4].size for item in found], dtype=np.int64),
        mtime_ns=np.array([int(item[4].mtime) * 1_000_000_000 for item in found], dtype=np.int64),
        failures=failures, notes=notes, shards=[os.path.abspath(p) for p in paths],
        shard_of=np.array([item[3] for item in found], dtype=np.int64),
        offsets=np.array([item[4].offset_data for item in found], dtype=np.int64),
        lengths=np.array([item[4].size for item in found], dtype=np.int64))


def _samples(path: str, wanted: set[str]) -> tuple[dict[str, _Sample], str]:
    """key -> _Sample of one shard (headers and label members only), and what stopped the listing
    early ("" if nothing). The shard is mapped into memory: only the pages holding headers and
    label members are ever read from disk."""
    samples: dict[str, _Sample] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(3)
        if magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z":
            raise InputFileError(f"shard {display_path(path)} is compressed; shards must be plain .tar files "
                                 "(WebDataset's default), which can be read without unpacking")
        if size < 512:
            raise InputFileError(f"shard {display_path(path)} is not a tar file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                for member in _members(data, size):
                    name = _clean(member.name)
                    folder, _, base = name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot or not stem:
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    sample = samples.setdefault(key, _Sample(key))
                    if is_image_name(name) and sample.image is None:
                        sample.image = member
                    elif ext.lower() in wanted and ext.lower() not in sample.side:
                        small = member.size <= SIDE_MEMBER_BYTES
                        sample.side[ext.lower()] = data[member.offset_data:member.offset_data + member.size] if small else b""
            except _NotTar as e:
                if not samples:
                    raise InputFileError(f"shard {display_path(path)} is not a tar file ({e})") from None
                return samples, f"unreadable after {len(samples)} samples ({e})"
    return samples, ""


@dataclass
class _Member:
    """A regular file in a tar: its name, where its data starts, its size and mtime (seconds)."""

    name: str
    offset_data: int
    size: int
    mtime: int


class _NotTar(Exception):
    pass


def _members(data, file_size: int):
    """The regular files of an uncompressed tar (ustar, pax and GNU long names), from their 512-byte
    headers alone: data is skipped by seeking. Hand-written because `tarfile` parses each header
    in Python objects at several times the cost (benchmarks/shards_vs_folder.py); `tarfile` wrote the test
    shards in every format read here. Raises _NotTar at a header that is not one."""
    offset, pax, long_name = 0, {}, None
    while True:
        block = data[offset:offset + 512]
        if len(block) < 512:
            if offset < file_size:
                raise _NotTar(f"truncated header at byte {offset}")
            return  # no end-of-archive blocks: tolerated, like tar itself
        if block == bytes(512):
            return  # end of archive
        if _checksum(block) != _number(block[148:156]):
            raise _NotTar(f"bad header checksum at byte {offset}")
        size, kind = _number(block[124:136]), block[156:157]
        start = offset + 512
        following = start + (size + 511) // 512 * 512
        if kind in (b"x", b"L"):
            if size > SIDE_MEMBER_BYTES:
                raise _NotTar(f"an extended header of {size} bytes at byte {offset}")
            payload = data[start:start + size]
            if kind == b"x":
                pax = _pax(payload)
            else:
                long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind != b"g":
            name = pax.get("path") or long_name or _ustar_name(block)
            size = int(pax.get("size", size))
            if kind in (b"0", b"\0", b"7"):
                yield _Member(name, start, size, int(float(pax.get("mtime", _number(block[136:148])))))
                if start + size > file_size:  # listed (it fails when read); nothing after it is
                    raise _NotTar(f"the file ends inside member {name}")
            following = start + (size + 511) // 512 * 512
            pax, long_name = {}, None
        offset = following


def _checksum(block: bytes) -> int:
    return sum(block[:148]) + 8 * 32 + sum(block[156:])


def _number(field: bytes) -> int:
    """A tar numeric field: octal text, or base-256 when its first byte has the high bit set."""
    if field and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _NotTar(f"a header field {field[:12]!r} is not a number") from None


def _ustar_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


def _pax(payload: bytes) -> dict[str, str]:
    """A pax extended header's records ("LEN key=value\n")."""
    found, i = {}, 0
    while i < len(payload):
        space = payload.find(b" ", i)
        if space < 0:
            break
        try:
            length = int(payload[i:space])
        except ValueError:
            raise _NotTar("a malformed pax header") from None
        if length <= 0:
            break
        key, _, value = payload[space + 1:i + length - 1].partition(b"=")
        found[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        i += length
    return found


def _clean(name: str) -> str:
    """A member name as a relative path: `./a/b.jpg` -> `a/b.jpg`."""
    return os.path.normpath(name).lstrip("/") if name not in ("", ".") else name


def _describe(key: str) -> str:
    return f"field {key[5:]!r} of its .json member" if key.startswith("json:") else f"its .{key} member"


def _field(sample: _Sample, key: str) -> str:
    """The text of member KEY.EXT, or field FIELD of KEY.json, stripped ("" when absent)."""
    kind, _, name = key.partition(":") if key.startswith("json:") else ("", "", key)
    raw = sample.side.get("json" if kind else name.lower())
    if not raw:
        return ""
    text = raw.decode("utf-8", "replace").strip()
    if not kind:
        return text
    try:
        value = json.loads(text).get(name) if text.startswith("{") else None
    except (json.JSONDecodeError, AttributeError):
        return ""
    return "" if value is None or isinstance(value, (dict, list)) else str(value).strip()


# --- which shards each torchrun rank reads --------------------------------------------------------------

def my_positions(listing: ShardListing, d: Place) -> np.ndarray:
    """Listing positions of this rank: the images of a contiguous run of whole shards, the runs
    cut where the image count reaches r/W of the total (each shard is read by one rank only)."""
    counts = np.bincount(listing.shard_of, minlength=len(listing.shards))
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    lo = total * d.rank // d.world_size
    hi = total * (d.rank + 1) // d.world_size
    first = int(np.searchsorted(ends, lo, side="right")) if d.rank else 0
    last = int(np.searchsorted(ends, hi, side="right")) if d.rank < d.world_size - 1 else len(counts)
    mine = np.isin(listing.shard_of, np.arange(first, last))
    return np.flatnonzero(mine).astype(np.int64)


# --- reading members for the extraction loop --------------------------------------------------------------

class MemberDataset(torch.utils.data.Dataset):
    """Rows `order[i]` of a rank's part -> (row, crop or None, reason or None, content hash), as
    decode.ImageDataset gives for files; each worker keeps its open shards."""

    def __init__(self, members: list[tuple[str, int, int]], order: list[int], transform):
        self.members, self.order, self.transform = members, order, transform
        self._open: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.order)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def _read(self, shard: str, offset: int, length: int) -> bytes:
        f = self._open.get(shard)
        if f is None:
            for old in list(self._open)[:-3]:  # a few shards open at a time
                self._open.pop(old).close()
            f = self._open[shard] = open(shard, "rb")
        f.seek(offset)
        return f.read(length)

    def __getitem__(self, i: int):
        row = self.order[i]
        shard, offset, length = self.members[row]
        try:
            data = self._read(shard, offset, length)
        except OSError as e:
            return row, None, short_reason(f"cannot read shard {os.path.basename(shard)}: {e}"), ""
        digest = hashlib.new(HASH_NAME, data).hexdigest()
        if len(data) < length:
            return row, None, f"truncated member ({len(data)} of {length} bytes: the shard ends early)", digest
        try:
            return row, self.transform(decode_image_bytes(data)), None, digest
        except DecodeError as e:
            return row, None, e.reason, digest
        except Exception as e:  # noqa: BLE001 - a transform failure is one bad image too
            return row, None, short_reason(f"preprocessing failed: {type(e).__name__}: {e}"), digest

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def batches(listing: ShardListing, positions: np.ndarray, rows: list[int], prep, batch_size: int, workers: int,
            device: torch.device) -> decoding.BatchStream:
    """ImageBatches of partial-file rows `rows` (row r is listing position positions[r]), read shard
    by shard in file order (sequential reads; a resumed run skips what is committed)."""
    members = [(listing.shards[int(listing.shard_of[p])], int(listing.offsets[p]), int(listing.lengths[p]))
               for p in positions.tolist()]
    order = sorted(rows, key=lambda r: (listing.shard_of[positions[r]], listing.offsets[positions[r]]))
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        MemberDataset(members, order, prep.pil_transform()), batch_size=batch_size, num_workers=workers,
        prefetch_factor=4 if workers else None, collate_fn=decoding.collate, pin_memory=cuda)
    return decoding.BatchStream(loader, prefetch=not cuda and workers == 0)


def describe(listing: ShardListing, label_key: str, split_key: str | None) -> dict:
    """What the cache records about where its images came from."""
    return {"webdataset": listing.shards, "label_key": label_key, "split_key": split_key or ""}

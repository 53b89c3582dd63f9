"""Reading images: find them in an ImageFolder tree and decode each one to RGB, safely.

Used by every stage that opens image files: extraction, predict, the report pages. Nothing here
knows about networks; `backbones.Preprocessing` turns a decoded image into the tensor a backbone
wants. A listing also records each file's size, mtime and (when it is read) content hash: what
tells an unchanged file from a changed one when a cache is updated (`extraction.update`).
`extraction.manifest` lists the images of a CSV/JSONL manifest into the same `ImageListing`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import TransferError
from .files import display_path, file_kind

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")
# Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS). A file declaring more is treated as a
# decompression bomb and refused before any pixel buffer is allocated.
MAX_PIXELS = 2 * 89_478_485


@dataclass(frozen=True)
class ImageListing:
    """Every image under an ImageFolder root, in a deterministic order.

    paths: N paths relative to root, as `os.fsdecode` gives them (non-UTF-8 bytes survive as
    surrogates, so `os.fsencode(path)` recovers the exact name). labels: (N,) int64, an index
    into classes. splits: N split names, or None when the tree has no split folders.
    """

    root: str
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    splits: list[str] | None
    skipped: list[tuple[str, str]]  # (path relative to root, why) of what is not listed
    # Per file (N,): size in bytes and st_mtime_ns, -1 where the file cannot be stat'ed.
    sizes: np.ndarray = None
    mtime_ns: np.ndarray = None
    failures: dict[int, str] = field(default_factory=dict)  # position -> reason known from the listing alone
    extras: dict[str, list[str]] = field(default_factory=dict)  # manifest columns beyond path/label/split
    notes: list[str] = field(default_factory=list)  # one line per problem found while listing
    manifest: str | None = None  # the manifest file this listing came from

    def __post_init__(self):
        if self.sizes is None or self.mtime_ns is None:
            sizes, mtimes = stat_files(self.root, self.paths)
            object.__setattr__(self, "sizes", sizes)
            object.__setattr__(self, "mtime_ns", mtimes)

    def __len__(self) -> int:
        return len(self.paths)


def stat_files(root: str, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 sizes and (N,) int64 st_mtime_ns of root/paths[i] (symlinks followed); -1 for a
    file that cannot be stat'ed (missing, dangling link), which therefore never counts as unchanged."""
    sizes = np.full(len(paths), -1, dtype=np.int64)
    mtimes = np.full(len(paths), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(os.path.join(root, p))
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


# sha256 rather than blake2b: with the SHA extensions of current x86 and ARM CPUs OpenSSL's sha256
# is about twice as fast (measured here: 564 vs 272 MB/s), and `sha256sum` checks it by hand.
HASH_NAME = "sha256"
_HASH_BLOCK = 1 << 20


def content_hash(path: str) -> str:
    """Hex sha256 of a file's bytes, or "" when it cannot be read (or is not a regular file)."""
    h = hashlib.new(HASH_NAME)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would block forever
            return ""
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)  # releases the GIL for large blocks: threads hash in parallel
    except OSError:
        return ""
    return h.hexdigest()


def content_hashes(root: str, paths: list[str], threads: int | None = None) -> np.ndarray:
    """(N,) object array of `content_hash` of root/paths[i], read by a few threads at once."""
    threads = threads or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(threads) as pool:
        found = list(pool.map(content_hash, (os.path.join(root, p) for p in paths), chunksize=64))
    out = np.empty(len(found), dtype=object)
    out[:] = found
    return out


def _sort_key(name: str) -> bytes:
    # Sort on the bytes of the name: the same order on every machine and locale.
    return os.fsencode(name)


def _visible_subdirs(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    return sorted(names, key=_sort_key)


def _folder_key(path: str) -> tuple[int, int]:
    st = os.stat(path)  # follows symlinks: the folder itself
    return st.st_dev, st.st_ino


class Walker:
    """The one folder walker, for extraction and prediction alike.

    Lists the non-hidden files under folders, sorted by the bytes of their relative paths. A
    symlinked folder is followed only when it leads to a folder not listed yet, so a symlink loop
    (`ln -s .. photos/ants/up`) or a second way into the same folder never lists a file twice or
    under another class. Only regular files (after symlinks) and dangling symlinks (reported later
    as broken) are listed; FIFOs, sockets and devices, which would block a reader, are skipped.
    `skipped` collects (path, reason) for everything left out this way.
    """

    def __init__(self, tops: list[str]):
        self.known: set[tuple[int, int]] = set()  # every real folder under tops: listed where it really is
        self.skipped: list[tuple[str, str]] = []
        for top in tops:
            self._index(top)

    def _index(self, top: str) -> None:
        self.known.add(_folder_key(top))
        for dirpath, dirnames, _ in os.walk(top):  # without following symlinks
            for d in dirnames:
                path = os.path.join(dirpath, d)
                if not os.path.islink(path):
                    st = os.lstat(path)
                    self.known.add((st.st_dev, st.st_ino))

    def files(self, folder: str, shown_as: str = "") -> list[str]:
        """Files under `folder`, relative to it. shown_as: how skipped entries are named (their prefix)."""
        found: list[str] = []
        self._walk(folder, "", shown_as, found)
        return sorted(found, key=_sort_key)

    def _walk(self, folder: str, rel: str, shown_as: str, found: list[str]) -> None:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: _sort_key(e.name))
        for e in entries:
            r = os.path.join(rel, e.name) if rel else e.name
            shown = os.path.join(shown_as, r) if shown_as else r
            try:
                is_dir, is_file = e.is_dir(), e.is_file()  # both follow symlinks
            except OSError:
                is_dir = is_file = False
            if is_dir and e.is_symlink():
                key = _folder_key(e.path)
                if key in self.known:
                    self.skipped.append((shown, "symlink to a folder that is already listed (a loop or a second "
                                                "way in); not followed"))
                    continue
                self._index(e.path)
                self._walk(e.path, r, shown_as, found)
            elif is_dir:
                self._walk(e.path, r, shown_as, found)
            elif is_file or (e.is_symlink() and not os.path.exists(e.path)):
                found.append(r)
            else:
                self.skipped.append((shown, f"not a regular file ({_file_kind(e.path)})"))


def _file_kind(path: str) -> str:
    try:
        return file_kind(os.stat(path).st_mode)
    except OSError:
        return "unreadable"


def walk_files(folder: str, skipped: list[tuple[str, str]] | None = None) -> list[str]:
    """All files `Walker` lists under one folder, relative to it; what it skips goes to `skipped`."""
    walker = Walker([folder])
    found = walker.files(folder)
    if skipped is not None:
        skipped += walker.skipped
    return found


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike) -> ImageListing:
    """List IMAGE_DIR/CLASS/... or IMAGE_DIR/{train,val,test}/CLASS/... in a deterministic order."""
    root = os.fspath(root)
    shown_root = display_path(root)
    if not root:
        raise TransferError("no image folder given (an empty name); expected a folder with one subfolder per class")
    if not os.path.exists(root):
        raise TransferError(f"image folder {shown_root} does not exist")
    if not os.path.isdir(root):
        raise TransferError(f"{shown_root} is not a folder; expected a folder with one subfolder per class")
    subdirs = _visible_subdirs(root)
    if not subdirs:
        raise TransferError(
            f"{shown_root} has no class folders; expected one subfolder per class, e.g. {shown_root}/apple/1.jpg"
        )
    split_dirs = [d for d in subdirs if d in SPLIT_NAMES]
    if split_dirs and len(split_dirs) != len(subdirs):
        others = [d for d in subdirs if d not in SPLIT_NAMES]
        raise TransferError(
            f"{shown_root} mixes split folders ({', '.join(split_dirs)}) with other folders "
            f"({', '.join(others[:3])}); expected either only class folders or only train/val/test"
        )
    if split_dirs:
        trees = [(s, os.path.join(root, s)) for s in SPLIT_NAMES if s in split_dirs]
    else:
        trees = [(None, root)]
    per_tree = {}
    for split, base in trees:
        classes_here = _visible_subdirs(base)
        if not classes_here:
            raise TransferError(f"split folder {display_path(base)} has no class folders")
        per_tree[split] = classes_here
    classes = sorted({c for cs in per_tree.values() for c in cs}, key=_sort_key)
    index = {c: i for i, c in enumerate(classes)}
    tops = [root] + [base for _, base in trees] + [os.path.join(base, c) for s, base in trees for c in per_tree[s]]
    walker = Walker(tops)

    paths, labels, splits, skipped = [], [], [], []
    for split, base in trees:
        prefix = "" if split is None else split
        skipped += [(os.path.join(prefix, f), why) for f, why in _loose_entries(base)]
        for cls in per_tree[split]:
            files = walker.files(os.path.join(base, cls), os.path.join(prefix, cls))
            images = [f for f in files if is_image_name(f)]
            skipped += [(os.path.join(prefix, cls, f), "no image extension") for f in files if not is_image_name(f)]
            if not images:
                raise TransferError(
                    f"class folder {display_path(os.path.join(base, cls))} has no images "
                    f"(looked for {', '.join(IMAGE_EXTENSIONS)}, any case)"
                )
            paths += [os.path.join(prefix, cls, f) for f in images]
            labels += [index[cls]] * len(images)
            splits += [split] * len(images)
    return ImageListing(
        root=root,
        classes=classes,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        splits=splits if split_dirs else None,
        skipped=sorted(skipped + walker.skipped, key=lambda item: _sort_key(item[0])),
    )


def _loose_entries(folder: str) -> list[tuple[str, str]]:
    """Entries beside the class (or split) folders that are not folders, with why they are left out."""
    out = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(".") or e.is_dir():
                continue
            if e.is_symlink() and not os.path.exists(e.path):
                out.append((e.name, "dangling symlink where a class folder would be"))
            else:
                out.append((e.name, "not inside a class folder"))
    return sorted(out, key=lambda item: _sort_key(item[0]))


class DecodeError(Exception):
    """An image that cannot be used; `reason` is one short line for the cache's `failed` list."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(path: str) -> Image.Image:
    """Decode one file to an RGB image as a viewer shows it (EXIF orientation applied).

    Raises DecodeError, never anything else, so one bad file cannot stop a run.
    """
    with _one_reason(path):
        return _decode(path)


@contextlib.contextmanager
def _one_reason(path: str | None):
    """Any failure reading or decoding one image (of file `path`, or bytes in memory) as a DecodeError."""
    try:
        yield
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("dangling symlink" if path and os.path.islink(path) else "file not found") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except IsADirectoryError:
        raise DecodeError("is a directory") from None
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is one bad image, not a crash
        raise DecodeError(short_reason(f"corrupt image: {type(e).__name__}: {e}")) from None


def short_reason(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode(path: str) -> Image.Image:
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise DecodeError("is a directory")
    if not stat.S_ISREG(mode):  # opening a FIFO would block forever
        raise DecodeError(f"not a regular file ({_file_kind(path)})")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise DecodeError("empty file (0 bytes)")
        return _decode_open(f)


def _decode_open(f) -> Image.Image:
    """An open binary file (or BytesIO) -> RGB, oriented; the pixel limit checked before decoding."""
    with warnings.catch_warnings():
        # Pillow warns about sizes under our limit (checked below) and about recoverable damage
        # such as corrupt EXIF; neither should interrupt a progress bar.
        warnings.simplefilter("ignore")
        img = Image.open(f)
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise DecodeError(
                f"declares {width}x{height} pixels, over the {MAX_PIXELS:,} pixel limit "
                "(decompression bomb?)"
            )
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)


def decode_image_bytes(data: bytes) -> Image.Image:
    """`decode_image` for a file's bytes already in memory (a tar member, an engine's `bytes`
    column): the same decoder, limits, orientation and RGB conversion, so the same pixels.
    Raises DecodeError, never anything else."""
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    with _one_reason(None):
        return _decode_open(io.BytesIO(data))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited over white, as viewers show it."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        # Pillow's convert("L") clips 16-bit samples at 255 (a white image); scale them instead.
        deep = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(deep, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    transparent = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if transparent:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return img.convert("RGB")

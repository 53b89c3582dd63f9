"""Turning image files into batches of crops for the network, by one of two paths.

- `pil`: each file decoded by Pillow (`images.decode_image`) and resized and cropped by Pillow
  (`Preprocessing.pil_transform`), in DataLoader workers or inline.
- `torch`: JPEG files are read as bytes, decoded in batches by `torchvision.io.decode_jpeg` on the
  extraction device (nvJPEG on a GPU, libjpeg-turbo on the CPU), then resized and cropped there with
  Pillow's own filter weights and rounding (`resize.resize_crop`: the same bits as Pillow).
  Anything else - other formats, CMYK, files Pillow would call truncated or too large, and
  whatever `decode_jpeg` rejects - takes the Pillow path, one image at a time.

Both give (3, S, S) uint8 crops. On the CPU they are bit-equal where torchvision and Pillow bundle
the same libjpeg-turbo (they do here: benchmarks/extract_throughput.py checks it on the real photos).
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import stat
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..devices import Choice
from ..images import HASH_NAME, MAX_PIXELS, DecodeError, content_hash, decode_image, short_reason
from .. import resize
from ..resize import VERTICAL_FIRST_IF_TALLER_CUT

DECODE_CHOICES = ("auto", "pil", "torch")
ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads
CHUNK = 32  # same-size images resized together on the device


def resolve_decode(requested: str, device: torch.device, earlier: str | None = None) -> Choice:
    """`auto` -> torch on a GPU; on the CPU, pil: decoding costs the same there (both bundle
    libjpeg-turbo), and Pillow's C resize is far faster than the exact resize in torch ops
    (benchmarks/extract_throughput.py, decode rows). A run of the same extraction keeps its path."""
    if requested != "auto":
        return Choice(requested, "asked for")
    if earlier in ("pil", "torch"):
        return Choice(earlier, "auto: kept from the earlier run of this extraction")
    if device.type == "cuda":
        return Choice("torch", "auto: decode_jpeg on the GPU (nvJPEG), resize and crop there")
    return Choice("pil", "auto: Pillow on the CPU (measured faster than the torch path here)")


# --- the pil path: files -> crops (in the loader) -------------------------------------------------------

@dataclass
class ImageBatch:
    """indices: (B,) int64 listing positions of the decoded images; images: (B, 3, S, S) uint8;
    failed: (listing position, reason) for the images that could not be used; hashes: listing
    position -> content hash, for every file of the batch."""

    indices: torch.Tensor
    images: torch.Tensor
    failed: list[tuple[int, str]]
    hashes: dict[int, str] = field(default_factory=dict)

    def pin_memory(self) -> "ImageBatch":
        return ImageBatch(self.indices.pin_memory(), self.images.pin_memory(), self.failed, self.hashes)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses listing positions `order[i]`; a bad file yields its reason."""

    def __init__(self, root: str, paths: list[str], order: list[int], transform):
        self.root, self.paths, self.order, self.transform = root, paths, order, transform

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, str]:
        position = self.order[i]
        path = os.path.join(self.root, self.paths[position])
        digest = content_hash(path)  # the second read below comes from the page cache
        try:
            return position, self.transform(decode_image(path)), None, digest
        except DecodeError as e:
            return position, None, e.reason, digest
        except Exception as e:  # noqa: BLE001 - a transform failure is one bad image too
            return position, None, short_reason(f"preprocessing failed: {type(e).__name__}: {e}"), digest


def collate(samples: list[tuple[int, torch.Tensor | None, str | None, str]]) -> ImageBatch:
    good = [(i, x) for i, x, _, _ in samples if x is not None]
    failed = [(i, reason) for i, x, reason, _ in samples if x is None]
    if good:
        images = torch.stack([x for _, x in good])
    else:
        images = torch.empty((0, 3, 1, 1), dtype=torch.uint8)
    return ImageBatch(torch.tensor([i for i, _ in good], dtype=torch.int64), images, failed,
                      {i: digest for i, _, _, digest in samples})


# --- the torch path: files -> bytes (in the loader) -> pixels and crops (on the device) ---------------

@dataclass
class Encoded:
    """One JPEG file, read but not decoded: data (n,) uint8; orientation: its EXIF orientation (1-8);
    digest: the sha256 of its bytes (the cache's content hash)."""

    path: str
    data: torch.Tensor
    orientation: int
    digest: str = ""


def read_jpeg(path: str) -> Encoded | None:
    """The bytes of a plain JPEG (8-bit RGB or grayscale, complete, within the pixel limit) with its
    EXIF orientation; None for anything the Pillow path should handle instead."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            data = f.read()
        # A file that does not end with the end-of-image marker may be truncated: Pillow decides.
        if not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = Image.open(io.BytesIO(data))  # reads the markers only, no pixels
            width, height = header.size
            if header.format != "JPEG" or header.mode not in ("RGB", "L") or width * height > MAX_PIXELS:
                return None
            orientation = header.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - whatever goes wrong here, the Pillow path reports it properly
        return None
    return Encoded(path, torch.frombuffer(bytearray(data), dtype=torch.uint8),
                   orientation if orientation in range(1, 9) else 1, hashlib.new(HASH_NAME, data).hexdigest())


class EncodedDataset(ImageDataset):
    """Listing positions `order[i]` -> (position, Encoded, None, digest) for plain JPEGs; otherwise
    what ImageDataset gives: (position, crop, None, digest) or (position, None, reason, digest)."""

    def __getitem__(self, i: int):
        position = self.order[i]
        encoded = read_jpeg(os.path.join(self.root, self.paths[position]))
        return (position, encoded, None, encoded.digest) if encoded is not None else super().__getitem__(i)


@dataclass
class EncodedBatch:
    encoded: list[tuple[int, Encoded]]  # (listing position, file) to decode on the device
    crops: list[tuple[int, torch.Tensor]]  # (listing position, (3, S, S) uint8) from the Pillow path
    failed: list[tuple[int, str]]
    hashes: dict[int, str]  # listing position -> content hash, for every file of the batch


def collate_encoded(samples: list) -> EncodedBatch:
    return EncodedBatch([(i, x) for i, x, _, _ in samples if isinstance(x, Encoded)],
                        [(i, x) for i, x, _, _ in samples if isinstance(x, torch.Tensor)],
                        [(i, reason) for i, x, reason, _ in samples if x is None],
                        {i: digest for i, _, _, digest in samples})


class DeviceDecoder:
    """EncodedBatch -> ImageBatch with its images on `device`: decode_jpeg in one call, the EXIF
    orientation, then Pillow's resize and the centre crop, all on the device."""

    def __init__(self, device: torch.device, preprocessing, transform):
        self.device, self.prep, self.transform = device, preprocessing, transform

    def __call__(self, batch: EncodedBatch) -> ImageBatch:
        crops = {i: x.to(self.device) for i, x in batch.crops}
        failed = list(batch.failed)
        decoded = decode_jpegs([e.data for _, e in batch.encoded], self.device)
        pixels = []
        for (position, e), x in zip(batch.encoded, decoded):
            if x is not None:
                pixels.append((position, orient(x, e.orientation)))
                continue
            try:  # decode_jpeg refused it: Pillow decides, one image
                crops[position] = self.transform(decode_image(e.path)).to(self.device)
            except DecodeError as err:
                failed.append((position, err.reason))
        for (position, _), crop in zip(pixels, resize_crop([x for _, x in pixels], self.prep)):
            crops[position] = crop
        order = sorted(crops)
        images = torch.stack([crops[i] for i in order]) if order else torch.empty((0, 3, 1, 1), dtype=torch.uint8)
        return ImageBatch(torch.tensor(order, dtype=torch.int64), images, sorted(failed), batch.hashes)


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 RGB on `device` per file, or None where decode_jpeg fails. One batched call;
    when it fails, file by file."""
    if not datas:
        return []
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of TorchCodec (torchcodec >= 0.16),
        # which the GPU machines we target (torchvision 0.26) do not have yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for data in datas:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) -> the image as ImageOps.exif_transpose shows it (EXIF orientation 1-8)."""
    if orientation in (5, 6, 7, 8):
        x = x.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return x.flip(flips) if flips else x


def resize_crop(images: list[torch.Tensor], prep) -> list[torch.Tensor]:
    """(3, H, W) uint8 images (any sizes, one device) -> (3, S, S) uint8 crops equal to
    `prep.pil_transform()` on the same pixels (`resize.resize_crop`, bit for bit). Images of one
    size are resized together, CHUNK at a time."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, x in enumerate(images):
        groups.setdefault(tuple(x.shape[-2:]), []).append(k)
    bicubic, rule = prep.interpolation == "bicubic", prep.pass_order == VERTICAL_FIRST_IF_TALLER_CUT
    for members in groups.values():
        for start in range(0, len(members), CHUNK):
            part = members[start:start + CHUNK]
            crops = resize.resize_crop(torch.stack([images[k] for k in part]), prep.resize, prep.crop, bicubic, rule,
                                       prep.resize_mode == "squash")
            for k, crop in zip(part, crops):
                out[k] = crop
    return out


# --- batches for the extraction loop -----------------------------------------------------------------

class BatchStream:
    """ImageBatch after ImageBatch; `wait_seconds` adds up the time the consumer waited for them
    (decoding, or waiting on the decoding workers): the input's share of the loop."""

    def __init__(self, batches, convert=None, prefetch: bool = False):
        self.wait_seconds = 0.0
        self._convert = convert
        self._source = iter(batches)  # now: DataLoader workers fork before the cache file is opened for writing
        self._queue = self._stop = None
        if prefetch:
            self._queue, self._stop = queue.Queue(maxsize=2), threading.Event()
            threading.Thread(target=self._produce, name="transfer-decode", daemon=True).start()

    def _produce(self) -> None:
        try:
            for batch in self._source:
                if not self._offer((batch, None)):
                    return
            self._offer((None, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._offer((None, e))

    def _offer(self, item) -> bool:
        """Put `item` in the queue unless the consumer stopped (it then never takes more, and a
        blocking put on a full queue would keep this thread forever); False when it stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> ImageBatch:
        started = time.perf_counter()
        try:
            if self._queue is None:
                batch = next(self._source)
            else:
                batch, error = self._queue.get()
                if error is not None:
                    raise error
                if batch is None:
                    raise StopIteration
            return self._convert(batch) if self._convert else batch
        finally:
            self.wait_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Stop the prefetching thread (if any) at its next batch."""
        if self._stop is not None:
            self._stop.set()


def batches(root: str, paths: list[str], rows: list[int], prep, batch_size: int, workers: int,
            device: torch.device, decode: str, prefetch: bool | None = None) -> BatchStream:
    """The ImageBatches of listing positions `rows` in order, `batch_size` positions each, decoded
    by `decode` ("pil" or "torch") in `workers` DataLoader processes, or in this process.

    prefetch (default: on the CPU whenever the Pillow path runs in this process): decode in one
    thread beside the network, two batches ahead. Measured on the 2-core development machine
    (benchmarks/extract_throughput.py --only overlap): decoding inline left the network waiting
    11-16% of the loop for EfficientNet-Lite0 and cost the forward passes much more (OpenMP's
    workers spin while one thread decodes; a thread keeps the passes back to back): a thread gave
    Lite0 2.3-3x, ResNet50 1.4x and VGG16 0.94-1.0x, one worker process 1.2x (Lite0)."""
    transform = prep.pil_transform()
    cuda = device.type == "cuda"
    common = dict(batch_size=batch_size, num_workers=workers, prefetch_factor=4 if workers else None)
    if decode == "torch":
        loader = torch.utils.data.DataLoader(EncodedDataset(root, paths, rows, transform),
                                             collate_fn=collate_encoded, **common)
        return BatchStream(loader, DeviceDecoder(device, prep, transform))
    loader = torch.utils.data.DataLoader(ImageDataset(root, paths, rows, transform), collate_fn=collate,
                                         pin_memory=cuda, **common)
    if prefetch is None:
        prefetch = not cuda
    return BatchStream(loader, prefetch=prefetch and workers == 0)

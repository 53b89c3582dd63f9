"""`Embedder`: `extract`'s decoding, preprocessing and network as one picklable callable, for the
engines that schedule batch inference themselves (Ray Data's `map_batches`, Spark's
`predict_batch_udf`, a plain loop).

    embed = Embedder(backbone="efficientnet_lite0")         # nothing loaded yet: cheap to pickle
    out = embed({"bytes": [open(p, "rb").read() for p in files], "path": files})
    out["embedding"]   # (N, D) float32, NaN rows where out["error"] says why the image failed
    out["path"]        # passed through; out["error"]: (N,) str, "" for a good image

Each worker process loads the network once, on its first batch. Images go through exactly what
`transfer extract` does (`images.decode_image_bytes` = `decode_image` on the file's bytes, the
backbone's Pillow resize and crop, the same normalization, device and precision rules), so the
features equal extract's for the same files. `backbones.Embedder` is the device/precision runner
underneath (`Runner` here). `provenance()` is what a cache of these features records
(`write_cache(..., provenance=...)`), so that fit, export and `merge_caches` accept it.
"""

from __future__ import annotations

import datetime
import hashlib
import os

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image

from .. import devices
from ..backbones import TTA_MODES, Backbone, check_backbone_name, load_backbone, preprocessing_values
from ..backbones import Embedder as Runner
from ..errors import SettingError
from ..images import HASH_NAME, DecodeError, decode_image_bytes, short_reason, to_rgb

IMAGE_COLUMNS = ("bytes", "image")  # what `column=None` looks for, in this order
CPU_CHUNK = 16  # images per forward pass on the CPU (extract's default when it does not probe)
GPU_CHUNK = 256


class Embedder:
    """A picklable callable: batch (dict of equal-length columns) -> the same columns (the image
    column dropped) plus "embedding" (N, D) float32 and "error" (N,) str.

    The image column (`column`, default "bytes" or else "image") holds encoded files (bytes) or
    decoded uint8 images (H, W, 3) / (H, W) / (H, W, 4); an image that cannot be used gets a NaN
    embedding row and its reason in "error", and the batch goes on. With hashes=True an
    "content_hash" column (sha256 of the bytes, "" for decoded input) is added, as extract records.
    Options are extract's: backbone, weights, layer, tta, precision, preprocessing, device, seed,
    and batch_size (images per forward pass; default 16 on the CPU, 256 on a GPU)."""

    def __init__(self, backbone: str = "vgg16", weights: str | None = None, *, layer: str | None = None,
                 tta: str = "none", precision: str | None = "auto", preprocessing=None, device: str = "auto",
                 seed: int = 0, batch_size: int | None = None, column: str | None = None, hashes: bool = False):
        check_backbone_name(backbone)
        if tta not in TTA_MODES:
            raise SettingError(f"tta must be one of {', '.join(TTA_MODES)}, found {tta!r}")
        if precision not in (None, *devices.PRECISION_CHOICES):
            raise SettingError(f"precision must be one of {', '.join(devices.PRECISION_CHOICES)}, found {precision!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise SettingError(f"batch_size must be a positive whole number, found {batch_size!r}")
        if preprocessing is not None:
            preprocessing_values(preprocessing)
        self.options = dict(backbone=backbone, weights=weights, layer=layer, tta=tta, precision=precision,
                            preprocessing=preprocessing, device=device, seed=seed)
        self.batch_size, self.column, self.hashes = batch_size, column, hashes
        self._backbone: Backbone | None = None
        self._runner: Runner | None = None
        self._precision: devices.Choice | None = None

    # --- loaded once per process -----------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """What travels to a worker: the options only (each worker loads its own network)."""
        return {**self.__dict__, "_backbone": None, "_runner": None, "_precision": None}

    @property
    def backbone(self) -> Backbone:
        """The frozen network (on the CPU until the first batch), loaded on first use."""
        if self._backbone is None:
            o = self.options
            self._backbone = load_backbone(o["backbone"], o["weights"], o["seed"], layer=o["layer"], tta=o["tta"],
                                           preprocessing=o["preprocessing"])
        return self._backbone

    def _device(self) -> torch.device:
        return devices.resolve_device(self.options["device"])

    @property
    def precision(self) -> devices.Choice:
        """extract's rule: bf16 on a GPU and on CPUs that compute bf16 natively, else fp32."""
        if self._precision is None:
            self._precision = devices.resolve_precision(self.options["precision"], self._device())
        return self._precision

    def runner(self) -> Runner:
        if self._runner is None:
            device = self._device()
            if device.type == "cuda":
                torch.cuda.set_device(device)
            self._runner = Runner(self.backbone, device, self.precision.value)
        return self._runner

    @property
    def dim(self) -> int:
        return self.backbone.dim

    def provenance(self) -> dict:
        """What a cache of these features records: the backbone's provenance, precision, decode
        path and library versions, as `transfer extract` writes them (`write_cache(provenance=)`)."""
        meta = {**self.backbone.provenance(), "precision": self.precision.value,
                "precision_choice": self.precision.why, "decode": "pil",
                "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
                "pillow_version": PIL.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if "timm" in self.backbone.versions:
            meta["timm_version"] = self.backbone.versions["timm"]
        return meta

    # --- one batch ------------------------------------------------------------------------------------

    def __call__(self, batch: dict) -> dict:
        """batch: {column: (N,) values}; see the class docstring for what comes back."""
        if not isinstance(batch, dict) or not batch:
            raise SettingError(f"Embedder takes a dict of columns, found {type(batch).__name__}")
        column = self._image_column(batch)
        values = list(batch[column])
        n = len(values)
        runner = self.runner()
        transform = self.backbone.preprocessing.pil_transform()
        crops: list[torch.Tensor | None] = [None] * n
        errors = [""] * n
        for i, value in enumerate(values):
            try:
                crops[i] = transform(_image(value))
            except DecodeError as e:
                errors[i] = e.reason
            except Exception as e:  # noqa: BLE001 - one bad image, never a crashed worker
                errors[i] = short_reason(f"preprocessing failed: {type(e).__name__}: {e}")
        embedding = np.full((n, self.dim), np.nan, dtype=np.float32)
        good = [i for i in range(n) if crops[i] is not None]
        chunk = self.batch_size or (GPU_CHUNK if runner.device.type == "cuda" else CPU_CHUNK)
        for lo in range(0, len(good), chunk):
            rows = good[lo:lo + chunk]
            embedding[rows] = runner(torch.stack([crops[i] for i in rows])).cpu().numpy()
        out = {k: v for k, v in batch.items() if k != column}
        out["embedding"] = embedding
        out["error"] = np.array(errors, dtype=object)
        if self.hashes:
            out["content_hash"] = np.array([hashlib.new(HASH_NAME, bytes(v)).hexdigest()
                                            if isinstance(v, (bytes, bytearray, memoryview)) else "" for v in values],
                                           dtype=object)
        return out

    def _image_column(self, batch: dict) -> str:
        if self.column is not None:
            if self.column not in batch:
                raise SettingError(f"Embedder: the batch has no column {self.column!r} (it has {', '.join(batch)})")
            return self.column
        for name in IMAGE_COLUMNS:
            if name in batch:
                return name
        raise SettingError(f"Embedder: the batch has none of the columns {', '.join(IMAGE_COLUMNS)} (it has "
                           f"{', '.join(map(str, batch))}); name the image column with column=")

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v not in (None, "none", "auto", 0))
        return f"Embedder({shown})"


def _image(value) -> Image.Image:
    """One image column value -> an RGB image, as extract decodes a file."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(value))
    if isinstance(value, (str, os.PathLike)):
        raise DecodeError("a path, not image bytes: read the file (ray.data.read_binary_files gives its bytes)")
    if value is None:
        raise DecodeError("no image (empty value)")
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise DecodeError(f"expected encoded bytes or a uint8 image (H, W[, 1|3|4]); found {array.dtype} "
                          f"array of shape {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.shape[0] * array.shape[1] > 0 and array.size:
        return to_rgb(Image.fromarray(np.ascontiguousarray(array)))
    raise DecodeError(f"empty image of shape {array.shape}")

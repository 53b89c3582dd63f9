"""What an extraction will do, decided before any image goes through the network: an ExtractPlan.

The request is checked; the images are listed (a folder tree or a manifest); the backbone is
built; device, precision, decoding path and batch size are resolved (`devices`, each with its
reason); and this process's partial file is resumed, or created holding every result it can reuse
from the previous cache at `out` and from an interrupted run of another listing (`update`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from numbers import Integral
from typing import Callable

import numpy as np
import PIL
import torch
import torchvision

from .. import cache, devices
from ..backbones import TTA_MODES, Backbone, Embedder, check_backbone_name, load_backbone, preprocessing_values
from ..devices import Choice, Place
from ..errors import SettingError, TransferError
from ..files import check_path_given, display_path, make_folder_for
from ..images import ImageListing, content_hashes, scan_image_folder
from ..settings import SEED, Interval, Options, validate_all
from . import decode as decoding
from . import distributed, webdataset
from .manifest import read_manifest
from .update import plan_update


@dataclass
class ExtractRequest:
    """Every option of an extraction; `CONSTRAINTS` declares what each allows."""

    image_dir: str | None  # a class-folder tree; or None with `manifest`
    out: str
    backbone: str = "vgg16"
    weights: str | None = None  # torchvision weights name, state_dict file, or "random"
    batch_size: int | None = None  # default: 256 on GPU; on CPU probed once per machine (devices.choose_batch_size)
    device: str = "auto"
    precision: str | None = "auto"  # auto: bf16 on GPU and on CPUs that compute bf16 natively, else fp32
    decode: str = "auto"  # pil | torch | auto: torch (decode_jpeg on the device) on GPU, pil on CPU
    workers: int | None = None  # decoding processes; default from the device and core count
    overwrite: bool = False
    seed: int = 0
    layer: str | None = None  # a module path (named_modules) to take pooled features from; None: penultimate
    tta: str = "none"  # "flip": the mean of each image's and its mirror image's embedding
    command: str = ""  # the command line, named in "resume with" messages
    manifest: str | None = None  # a .csv/.jsonl of path,label[,split] instead of image_dir
    check_content: bool = False  # an update compares files by content hash, not size and mtime
    retry_failed: bool = False  # images that failed in the cache go through the network again
    preprocessing: str | dict | None = None  # replaces (some of) the backbone's: "resize=256,crop=224,..."
    webdataset: str | list[str] | None = None  # tar shards ("shards/{000..099}.tar", [SPLIT=]...) instead of image_dir
    label_key: str = "cls"  # a sample's label in its shard: member KEY.<ext>, or json:FIELD of KEY.json
    split_key: str | None = None  # a sample's split, likewise (or SPLIT= before a shard list)

    CONSTRAINTS = {
        "batch_size": [None, Interval(Integral, 1, None)],
        "precision": [None, Options(devices.PRECISION_CHOICES)],
        "decode": [Options(decoding.DECODE_CHOICES)],
        "workers": [None, Interval(Integral, 0, None)],
        "seed": SEED,
        "tta": [Options(TTA_MODES)],
    }

    def check(self) -> None:
        """Every option, before anything is read or built."""
        validate_all(vars(self), self.CONSTRAINTS)
        check_path_given(self.out, "--out (the cache file to write)")  # '' would be the current folder
        check_path_given(self.manifest, "--manifest")
        given = [x is not None for x in (self.image_dir, self.manifest, self.webdataset)]
        if sum(given) != 1:
            raise SettingError("give either an image folder (IMAGE_DIR), a manifest (--manifest FILE.csv|.jsonl) "
                               "or tar shards (--webdataset 'shards/{000..099}.tar')"
                               + ({2: ", not both", 3: ", only one"}.get(sum(given), "")))
        if self.webdataset is not None:
            webdataset.check_key("--label-key", self.label_key)
            webdataset.check_key("--split-key", self.split_key)
            if self.check_content:
                raise SettingError("--check-content reads image files; with --webdataset a member's size and "
                                   "mtime in its tar header tell a changed image")
            if self.decode == "torch":
                raise SettingError("--decode torch reads JPEG files; tar members are decoded by Pillow "
                                   "(--decode pil or auto)")
        check_backbone_name(self.backbone)
        if self.preprocessing is not None:
            preprocessing_values(self.preprocessing)
        make_folder_for(self.out)
        if os.path.isdir(self.out):
            raise TransferError(f"--out {display_path(self.out)} is a folder; expected a file name such as "
                                f"{display_path(os.path.join(self.out, 'features.h5'))}")


@dataclass
class ExtractPlan:
    """What this process will do, decided before the network runs. `partial` is None when the
    cache at `out` already holds this very extraction of these very files (nothing to do)."""

    request: ExtractRequest
    place: Place
    listing: ImageListing
    backbone: Backbone
    embedder: Embedder
    precision: Choice
    decode: Choice
    batch: Choice | None
    workers: int
    meta: dict  # what the cache will record
    target: str  # this process's partial file
    positions: np.ndarray  # (n,) the listing positions this process extracts
    partial: cache.PartialCache | None = None
    already: int = 0  # rows of the partial file finished when this run starts (this process)
    prefilled: int = 0  # of which taken from the previous cache or an interrupted run
    reused: int = 0  # of which images (prefilled rows minus failures known from the listing)
    update: dict | None = None  # the update's account (UpdateCounts as a dict) when a cache is updated
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.listing)

    @property
    def device(self) -> torch.device:
        return self.embedder.device

    @property
    def resumed(self) -> int:
        """Rows an interrupted run of this extraction had already committed."""
        return self.already - self.prefilled

    def lines(self) -> list[str]:
        """The plan in a few lines for the user."""
        lines = [f"note: {note}" for note in self.notes[:10]]
        if len(self.notes) > 10:
            lines.append(f"note: ... and {len(self.notes) - 10} more")
        if self.update:
            u = self.update
            lines.append(f"updating {display_path(self.request.out)}: reused {u['reused']:,}, new {u['new']:,}, "
                         f"changed {u['changed']:,}, removed {u['removed']:,}, relabelled {u['relabelled']:,}")
        single = self.place.world_size == 1  # under torchrun `already` is this rank's shard: name the whole job
        what = f"{self.total - self.already:,} of {self.total:,}" if self.already and single else f"{self.total:,}"
        resumed = f", resuming after {self.resumed}" if self.resumed and single else ""
        ranks = "" if single else f", {self.place.world_size} ranks"
        lines.append(f"extracting {what} images with {self.request.backbone} on {self.device} "
                     f"({self.precision.value}, batch {self.batch.value}, {self.decode.value} decoding, "
                     f"decode workers: {self.workers}{ranks}){resumed}")
        for name, choice in (("precision", self.precision), ("batch size", self.batch), ("decode", self.decode)):
            if choice.why != "asked for":
                lines.append(f"  {name} {choice.value}: {choice.why}")
        return lines


def make_plan(req: ExtractRequest, place: Place) -> ExtractPlan:
    """Resolve everything for this process and prepare its partial file (the caller holds the lock)."""
    device = devices.resolve_device(req.device, place)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # streams, events and pinned copies all on this GPU
    if req.webdataset is not None:
        listing = webdataset.read_shards(req.webdataset, req.label_key, req.split_key)
    else:
        listing = read_manifest(req.manifest) if req.manifest is not None else scan_image_folder(req.image_dir)
    target = distributed.shard_path(req.out, place)
    cache.remove_stale_temporaries(target, "creating")
    backbone = load_backbone(req.backbone, req.weights, req.seed, layer=req.layer, tta=req.tta,
                             preprocessing=req.preprocessing)
    meta = {**_metadata(req, backbone, listing), "world_size": place.world_size}
    earlier = _earlier_run(req, target, meta)
    precision = _agreed(place, devices.resolve_precision(req.precision, device, earlier.get("precision")))
    decode = decoding.resolve_decode(req.decode, device, earlier.get("decode"))
    if req.webdataset is not None:
        decode = devices.Choice("pil", "tar members are decoded by Pillow")
    meta.update(precision=precision.value, precision_choice=precision.why, decode=decode.value)
    workers = req.workers if req.workers is not None else _default_workers(device, place.local_world_size)
    positions = (webdataset.my_positions(listing, place) if isinstance(listing, webdataset.ShardListing)
                 else distributed.my_positions(len(listing), place))
    embedder = Embedder(backbone, device, precision.value)
    if req.preprocessing is not None:
        _check_crop_fits(embedder, backbone)
    plan = ExtractPlan(req, place, listing, backbone, embedder, precision, decode, None, workers, meta, target,
                       positions, notes=list(listing.notes))
    start = _starting_point(req, meta, listing, positions, target)
    if start is None:
        return plan  # nothing to do
    # A batch size only when rows are to be computed: a finished cache costs no probe, nor does an
    # update with few images to run (pending: those this process computes).
    resumed = start == "resume"
    pending = len(cache.PartialCache(target).pending_rows()) if resumed else len(positions) - start.prefill.rows
    plan.batch = devices.choose_batch_size(
        req.batch_size, device, f"{backbone.name}; {backbone.layer}; {precision.value}; {backbone.preprocessing.crop}px",
        pending, _synthetic_forward(embedder, backbone.preprocessing.crop), earlier.get("batch_size"),
        probe_allowed=place.world_size == 1)
    meta.update(batch_size=plan.batch.value, batch_choice=plan.batch.why)
    if not resumed:
        start.create(req.out, target, meta, listing, positions, backbone.dim)
    plan.partial = cache.PartialCache(target)
    recorded = cache.PartialCache.read_meta(target)
    plan.prefilled, plan.reused = int(recorded.get("prefilled", 0)), int(recorded.get("reused", 0))
    if recorded.get("update"):
        meta["update"] = plan.update = recorded["update"]
    plan.notes += list(recorded.get("update_notes") or [])
    plan.already = plan.partial.progress().finished
    return plan


def _default_workers(device: torch.device, local_procs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, cores // max(1, local_procs) - 1))
    # On the CPU the network already keeps every core busy: a decoding process only competes with
    # it. Measured on 2 cores (benchmarks/extract_throughput.py --limit 96, VGG16): 0 workers
    # b/a 0.998, 1 worker 0.948, 2 workers 0.928. Larger machines get a little help with decoding.
    return 0 if cores <= 4 else 2


def _metadata(req: ExtractRequest, backbone: Backbone, listing: ImageListing) -> dict:
    meta = {
        **backbone.provenance(),
        "precision": None,
        "classes": listing.classes,
        "image_dir": os.path.abspath(listing.root),
        "image_dir_bytes": os.fsencode(os.path.abspath(listing.root)),  # exact, whatever the encoding
        "num_listed": len(listing),
        "listing_sha256": cache.listing_digest(listing.classes, listing.paths, listing.labels, listing.splits,
                                               listing.extras),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "pillow_version": PIL.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": req.command,
    }
    if listing.manifest is not None:
        meta["manifest"] = os.path.abspath(listing.manifest)
        meta["extra_columns"] = list(listing.extras)
    if isinstance(listing, webdataset.ShardListing):
        meta.update(webdataset.describe(listing, req.label_key, req.split_key))
    if "timm" in backbone.versions:
        meta["timm_version"] = backbone.versions["timm"]
    return meta


@dataclass
class _NewPartial:
    """A partial file to create, prefilled with what earlier results can give."""

    plan: object  # update.UpdatePlan
    sources: list
    prefill: cache.Prefill

    def create(self, out: str, target: str, meta: dict, listing: ImageListing, positions: np.ndarray,
               dim: int) -> None:
        extra = {"prefilled": self.prefill.rows,
                 "reused": self.prefill.rows - sum(p in listing.failures for p in positions.tolist())}
        if self.sources:
            extra.update(update=vars(self.plan.counts), update_notes=self.plan.notes)
            cache.check_space_for_update(out, len(listing) * dim * 4)
        cache.PartialCache.create(
            target, {**meta, **extra}, positions, [listing.paths[p] for p in positions], listing.labels[positions],
            None if listing.splits is None else [listing.splits[p] for p in positions], dim,
            sizes=listing.sizes[positions], mtime_ns=listing.mtime_ns[positions],
            extras={k: [v[p] for p in positions] for k, v in listing.extras.items()}, prefill=self.prefill)


def _starting_point(req: ExtractRequest, meta: dict, listing: ImageListing, positions: np.ndarray,
                    target: str) -> str | _NewPartial | None:
    """How this process's partial file starts: "resume" (it holds this same unfinished extraction),
    a _NewPartial with every result it can reuse from the previous cache at req.out and from an
    interrupted run of another listing, or None when req.out already holds this very extraction of
    these very files."""
    previous = _previous_cache(req.out, meta, req.overwrite)
    state, interrupted = _inspect_partial(target, meta, positions, req.overwrite)
    if state == "resume":
        return "resume"
    hashes = None
    if req.check_content and (previous or interrupted):
        hashes = content_hashes(listing.root, listing.paths)
    earlier_dir = None if previous is None else (previous.attrs.get("image_dir_bytes")
                                                 or os.fsencode(previous.attrs.get("image_dir") or ""))
    moved = previous is not None and earlier_dir != meta["image_dir_bytes"]
    if previous is not None and previous.attrs.get("listing_sha256") == meta["listing_sha256"] and not moved:
        # The same files under the same names: done, unless a file's size/mtime (or content) changed
        # or failed images are to be tried again. A folder moved elsewhere is an update that reuses
        # its unchanged rows and records where the images are now.
        unlisted = {os.fsencode(listing.paths[p]) for p in listing.failures}  # not files: nothing to retry
        retry = req.retry_failed and any(row < 0 and key not in unlisted
                                         for key, row in zip(previous.keys, previous.feature_rows.tolist()))
        if not retry and ((not previous.has_stats and not req.check_content) or plan_update(
                listing, [previous], req.check_content, hashes).unchanged):
            if interrupted is not None:
                os.remove(target)  # an abandoned run of another listing: nothing in it is needed now
            return None
    # --overwrite recomputes every image (a cache holding exactly this extraction was kept above).
    sources = [s for s in (interrupted, None if req.overwrite else previous) if s is not None]
    update = plan_update(listing, sources, req.check_content, hashes, req.retry_failed)
    if moved:
        update.notes.append(f"the images are now in {display_path(meta['image_dir_bytes'])} (the cache named "
                            f"{display_path(earlier_dir)}); recorded")
    return _NewPartial(update, sources, update.prefill(listing, sources, positions))


def _previous_cache(out: str, meta: dict, overwrite: bool) -> cache.Entries | None:
    """The results of the finished cache at `out` when it was made with the same settings (any
    image listing); None when there is none. A different extraction is refused (None with overwrite)."""
    if not os.path.exists(out):
        return None
    try:
        old = cache.check_cache(out)
    except TransferError as e:
        if overwrite:
            return None
        raise TransferError(f"{out} exists and is not a finished cache ({e}); pass --overwrite to replace it") from None
    if cache.identity(old, ignoring=("listing_sha256",)) != cache.identity(meta, ignoring=("listing_sha256",)):
        if overwrite:
            return None
        shown = cache.describe_difference({**old, "listing_sha256": ""}, {**meta, "listing_sha256": ""})
        raise TransferError(f"{out} holds a different extraction ({shown}); "
                            "pass --overwrite to replace it, or choose another --out")
    return cache.cache_entries(out)


def _inspect_partial(path: str, meta: dict, positions: np.ndarray, overwrite: bool) -> tuple[str, cache.Entries | None]:
    """("resume", None) when `path` holds this same unfinished extraction; ("new", entries) when it
    holds one of another listing with the same settings, whose committed rows can be reused;
    ("new", None) otherwise. An unfinished extraction with other settings is refused."""
    if os.path.isdir(path):
        raise TransferError(f"{path} is a folder where the partial cache file should go; move it away")
    if not os.path.exists(path):
        return "new", None
    try:
        old = cache.PartialCache.read_meta(path)
        if cache.identity(old) == cache.identity(meta) and np.array_equal(cache.PartialCache(path).positions(),
                                                                          positions):
            return "resume", None
        settings = ("listing_sha256",)
        reusable = not overwrite and cache.identity(old, ignoring=settings) == cache.identity(meta, ignoring=settings)
        entries = cache.partial_entries(path) if reusable else None
    except (OSError, KeyError):
        old = entries = None  # damaged by something else (writes never leave it unreadable)
    if entries is not None:
        return "new", entries  # replaced atomically by the new partial file once it is created
    if not overwrite and old is not None:
        raise TransferError(f"{path} holds an unfinished extraction with other settings "
                            f"({cache.describe_difference(old, meta)}); rerun its own command to resume it "
                            f"({old.get('command') or 'unknown'}), or pass --overwrite to discard it")
    os.remove(path)
    return "new", None


def _earlier_run(req: ExtractRequest, partial: str, meta: dict) -> dict:
    """The recorded settings of an unfinished (else a finished) run of this same extraction, whatever
    its precision, so that `auto` settings keep them; {} when there is none, or with --overwrite.
    Only an unfinished run passes on its batch size (a resume redoes whole batches at the same
    boundaries). An update of a changed folder keeps the precision too."""
    if req.overwrite:
        return {}
    ignoring = ("precision", "listing_sha256")
    found = {}
    for path, unfinished in ((partial, True), (req.out, False)):
        try:
            old = cache.PartialCache.read_meta(path) if unfinished else cache.check_cache(path)
        except (OSError, KeyError, TransferError):
            continue
        if cache.identity(old, ignoring=ignoring) == cache.identity(meta, ignoring=ignoring):
            found[unfinished] = old
    if True in found and found[True].get("listing_sha256") == meta["listing_sha256"]:
        return found[True]  # the run this one resumes
    # Else the finished cache this run updates (an abandoned run of another listing only if none).
    old = found.get(False, found.get(True, {}))
    return {k: v for k, v in old.items() if k != "batch_size"}


def _agreed(place: Place, choice: Choice) -> Choice:
    """Under torchrun, one precision for every rank: their shards become one cache."""
    if place.world_size == 1:
        return choice
    values = devices.gather(place, choice.value)
    return choice if len(set(values)) == 1 else Choice(
        "fp32", f"the ranks resolved different precisions ({', '.join(values)}); all use fp32")


def _check_crop_fits(embedder: Embedder, backbone: Backbone) -> None:
    """With --preprocessing, one crop of the chosen size through the network before any file is
    written: a size the network cannot take (a ViT's fixed grid) is one line, not a crash mid-run."""
    size = backbone.preprocessing.crop
    try:
        embedder(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    except (RuntimeError, ValueError, AssertionError) as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise SettingError(f"--preprocessing: {backbone.name} cannot take {size}x{size} crops ({reason}); "
                           "use the size it was trained at, or one it accepts") from None


def _synthetic_forward(embedder: Embedder, size: int) -> Callable[[int], None]:
    """forward(n): the network once over n random uint8 images of size x size (the batch probe)."""
    images = torch.randint(0, 256, (max(devices.CPU_BATCH_CANDIDATES), 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return lambda n: embedder(images[:n])

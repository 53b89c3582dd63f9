"""Stage 1, wired: images -> frozen backbone -> feature cache, resumable, one or many processes.

`run_extract` only composes the parts: `images` decodes, `backbones.Embedder` computes, `cache`
writes. Under torchrun, `distributed` gives each rank its slice and rank 0 assembles the shards.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import os
import time
from dataclasses import dataclass, field, fields
from numbers import Integral
from typing import Callable

import numpy as np
import PIL
import torch
import torchvision

from . import cache, decoding, devices, distributed
from .backbones import TTA_MODES, Embedder, check_backbone_name, load_backbone, resolve_device
from .backbones.base import preprocessing_values
from .errors import SettingError, TransferError
from .files import make_folder_for
from .images import ImageListing, content_hashes, scan_image_folder
from .manifest import read_manifest
from .settings import SEED, Interval, Options, validate_all
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

    CONSTRAINTS = {
        "batch_size": [None, Interval(Integral, 1, None)],
        "precision": [None, Options(devices.PRECISION_CHOICES)],
        "decode": [Options(decoding.DECODE_CHOICES)],
        "workers": [None, Interval(Integral, 0, None)],
        "seed": SEED,
        "tta": [Options(TTA_MODES)],
    }


class ExtractState(enum.Enum):
    WRITTEN = "written"
    ALREADY_COMPLETE = "already complete"  # the cache already held this very extraction
    SHARD_WRITTEN = "shard written"  # a non-zero torchrun rank: rank 0 assembles


@dataclass
class ExtractSummary:
    out: str
    state: ExtractState
    total: int  # images listed
    done: int  # images in the cache
    failed: int
    resumed_from: int  # images already committed when this run started
    processed: int  # images this run went through
    seconds: float  # wall time of this run
    images_per_second: float  # processed / time spent in the extraction loop
    out_bytes: int
    skipped: list[tuple[str, str]]  # (path, why) of files and folders not listed (no image extension, loops, FIFOs)
    failures: list[tuple[str, str]] = field(default_factory=list)
    device: str = ""
    batch_size: int = 0
    workers: int = 0
    world_size: int = 1
    reused: int = 0  # rows taken from the previous cache (or an interrupted run) without the network
    update: dict | None = None  # the update's account (UpdateCounts as a dict) when a cache was updated
    notes: list[str] = field(default_factory=list)  # one line each: manifest problems, update caveats
    precision: str = ""
    decode: str = ""
    input_seconds: float = 0.0  # time the extraction loop waited for decoded images (this process)


class ProgressSink:
    """Receives progress; the library never prints. `start` once, then `advance` per batch."""

    def start(self, total: int, already: int) -> None: ...

    def advance(self, images: int) -> None: ...


def extract(image_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
            progress: ProgressSink | None = None, on_ready: Callable[[dict], None] | None = None,
            **options) -> ExtractSummary:
    """Run a frozen pretrained network once over every image under `image_dir` (or listed in
    `manifest=`, a .csv/.jsonl of path,label[,split]) and cache its features in `out` (HDF5; see
    docs/cache-format.md). Resumes an interrupted run of the same extraction; keeps a finished one;
    updates a cache of the same settings whose images changed, running the network only on new and
    changed files. options: backbone, weights, layer, tta, batch_size, device, precision,
    decode, workers, overwrite, seed, manifest, check_content, retry_failed, preprocessing (the
    `transfer extract` options). `on_ready(info)` is called once before the work starts; for an
    update, info["update"] holds its account (reused, new, changed, removed, relabelled).

    >>> summary = extract("photos/", "cache/photos.h5", backbone="efficientnet_lite0")
    >>> summary.done, summary.failures                        # images cached, (path, reason) of the rest
    """
    names = [f.name for f in fields(ExtractRequest)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise SettingError(f"unknown extract option {unknown[0]!r}; expected any of {', '.join(names[2:])}")
    if out is None:
        raise SettingError("extract: out (the cache file to write) is required")
    image_dir = None if image_dir is None else os.fspath(image_dir)
    if options.get("manifest") is not None:
        options["manifest"] = os.fspath(options["manifest"])
    return run_extract(ExtractRequest(image_dir, os.fspath(out), **options), progress, on_ready)


def run_extract(req: ExtractRequest, progress: ProgressSink | None = None,
                on_ready: Callable[[dict], None] | None = None) -> ExtractSummary:
    """Extract features for every image under req.image_dir into req.out (see docs/cache-format.md)."""
    started = time.perf_counter()
    _check_request(req)
    with distributed.session() as dist, distributed.name_rank_in_errors(dist, req.out):
        device = resolve_device(distributed.device_for(dist, req.device))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # streams, events and pinned copies all on this GPU
        listing = read_manifest(req.manifest) if req.manifest is not None else scan_image_folder(req.image_dir)
        summary = ExtractSummary(
            out=req.out, state=ExtractState.WRITTEN, total=len(listing), done=0, failed=0, resumed_from=0, processed=0, seconds=0.0,
            images_per_second=0.0, out_bytes=0, skipped=listing.skipped, device=str(device),
            workers=req.workers if req.workers is not None else _default_workers(device, dist.local_world_size),
            world_size=dist.world_size)
        sharded = dist.world_size > 1
        target = distributed.shard_path(req.out, dist)
        with cache.WriterLock(target if sharded else req.out):
            cache.remove_stale_temporaries(target, "creating")
            backbone = load_backbone(req.backbone, req.weights, req.seed, layer=req.layer, tta=req.tta,
                                     preprocessing=req.preprocessing)
            meta = {**_metadata(req, backbone, listing, None), "world_size": dist.world_size}
            earlier = _earlier_run(req, target, meta)
            precision = _agreed(dist, devices.resolve_precision(req.precision, device, earlier.get("precision")))
            decode = decoding.resolve_decode(req.decode, device, earlier.get("decode"))
            meta.update(precision=precision.value, precision_choice=precision.why, decode=decode.value)
            positions = distributed.my_positions(len(listing), dist)
            embedder = Embedder(backbone, device, precision.value)
            chosen: list[devices.Choice] = []

            def settle(pending: int) -> dict:
                # Only when a partial file is created or resumed: a finished cache costs no batch probe,
                # nor does an update with few images to run (pending: those this process computes).
                chosen.append(devices.choose_batch_size(
                    req.batch_size, device,
                    f"{backbone.name}; {backbone.layer}; {precision.value}; {backbone.preprocessing.crop}px",
                    pending, _synthetic_forward(embedder, backbone.preprocessing.crop),
                    earlier.get("batch_size"), probe_allowed=not sharded))
                return {"batch_size": chosen[0].value, "batch_choice": chosen[0].why}

            shard = _prepare(req, meta, listing, positions, backbone.dim, target, dist, settle)
            if shard is None:
                return _finished(summary, ExtractState.ALREADY_COMPLETE, cache.read_cache(req.out), started)
            if not chosen:  # resumed: `earlier` is its partial file, whose batch size is kept
                settle(len(shard.pending_rows()))
            batch = chosen[0]
            shard_meta = cache.PartialCache.read_meta(target)
            meta.update(batch_size=batch.value, batch_choice=batch.why)
            summary.batch_size, summary.precision, summary.decode = batch.value, precision.value, decode.value
            prefilled, reused = int(shard_meta.get("prefilled", 0)), int(shard_meta.get("reused", 0))
            if shard_meta.get("update"):
                meta["update"] = summary.update = shard_meta["update"]
            summary.notes = listing.notes + list(shard_meta.get("update_notes") or [])
            before = shard.progress()
            if on_ready:
                on_ready({"device": summary.device, "precision": precision.value, "batch_size": batch.value,
                          "workers": summary.workers, "total": len(listing), "already": before.finished,
                          "reused": prefilled, "update": summary.update, "notes": summary.notes,
                          "rank": dist.rank, "world_size": dist.world_size, "partial": target,
                          "decode": decode.value, "why": {"precision": precision.why, "batch_size": batch.why,
                                                          "decode": decode.why}})
            reporter = distributed.progress_reporter(dist, req.out, progress or ProgressSink(), len(listing))
            reporter.start(before.finished)
            loop_started = time.perf_counter()
            processed, summary.input_seconds = _extract_rows(
                shard, embedder, listing.root, [listing.paths[p] for p in positions], backbone.preprocessing,
                batch.value, summary.workers, decode.value, reporter)
            left = shard.progress()
            if left.finished != left.total:
                raise TransferError(f"{target}: {left.total - left.finished} rows still pending after the run")
            counts = distributed.finish(dist, req.out, reporter, {"already": before.finished - prefilled,
                                                                  "processed": processed, "reused": reused})
            loop_seconds = time.perf_counter() - loop_started
            if counts is None:  # not rank 0: rank 0 assembles
                summary.processed = processed
                return _finished(summary, ExtractState.SHARD_WRITTEN, None, started)
            summary.resumed_from = sum(c["already"] for c in counts)
            summary.processed = sum(c["processed"] for c in counts)
            summary.reused = sum(c["reused"] for c in counts)
            summary.images_per_second = summary.processed / loop_seconds if loop_seconds > 0 else 0.0
            parts = distributed.all_parts(req.out, dist.world_size)
            with cache.WriterLock(req.out) if sharded else contextlib.nullcontext():
                info = cache.assemble(parts, req.out, meta)
                for part in parts:
                    os.remove(part)
    return _finished(summary, ExtractState.WRITTEN, info, started)


def _check_request(req: ExtractRequest) -> None:
    validate_all(vars(req), ExtractRequest.CONSTRAINTS)
    if (req.image_dir is None) == (req.manifest is None):
        raise SettingError("give either an image folder (IMAGE_DIR) or a manifest (--manifest FILE.csv|.jsonl)"
                           + (", not both" if req.manifest is not None else ""))
    check_backbone_name(req.backbone)
    if req.preprocessing is not None:
        preprocessing_values(req.preprocessing)
    make_folder_for(req.out)
    if os.path.isdir(req.out):
        raise TransferError(f"--out {cache.display_path(req.out)} is a folder; expected a file name such as "
                            f"{cache.display_path(os.path.join(req.out, 'features.h5'))}")


def _finished(summary: ExtractSummary, state: ExtractState, done: cache.Cache | None, started: float) -> ExtractSummary:
    summary.state = state
    summary.seconds = time.perf_counter() - started
    if done is not None:
        summary.done, summary.failed, summary.failures = done.n, len(done.failed), done.failed
        summary.out_bytes = os.path.getsize(done.path)
    return summary


def committed_so_far(out: str) -> str:
    """How far this process's part of an extraction into `out` got, for an interruption message:
    "N of M images are committed in PARTIAL; " or "" when nothing was started."""
    partial = distributed.shard_path(out, distributed.from_environment())
    if not os.path.exists(partial):
        return ""
    p = cache.PartialCache(partial).progress()
    return f"{p.finished} of {p.total} images are committed in {cache.display_path(partial)}; "


def _default_workers(device: torch.device, local_procs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, cores // max(1, local_procs) - 1))
    # On the CPU the network already keeps every core busy: a decoding process only competes with
    # it. Measured on 2 cores (benchmarks/extract_throughput.py --limit 96, VGG16): 0 workers
    # b/a 0.998, 1 worker 0.948, 2 workers 0.928. Larger machines get a little help with decoding.
    return 0 if cores <= 4 else 2


def _metadata(req: ExtractRequest, backbone, listing: ImageListing, precision: str | None) -> dict:
    meta = {
        **backbone.provenance(),
        "precision": precision,
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
    if "timm" in backbone.versions:
        import timm

        meta["timm_version"] = timm.__version__
    return meta


def _prepare(req: ExtractRequest, meta: dict, listing: ImageListing, positions: np.ndarray, dim: int,
             target: str, dist, settle: Callable[[int], dict]) -> cache.PartialCache | None:
    """The partial file this process fills: resumed, or created with every result it can reuse
    from the previous cache at req.out and from an interrupted run of another listing. None when
    req.out already holds this very extraction of these very files."""
    previous = _previous_cache(req.out, meta, req.overwrite)
    state, interrupted = _inspect_partial(target, meta, positions, req.overwrite)
    if state == "resume":
        return cache.PartialCache(target)
    hashes = None
    if req.check_content and (previous or interrupted):
        hashes = content_hashes(listing.root, listing.paths)
    if previous is not None and previous.attrs.get("listing_sha256") == meta["listing_sha256"]:
        # The same files under the same names: done, unless a file's size/mtime (or content) changed
        # or failed images are to be tried again.
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
    plan = plan_update(listing, sources, req.check_content, hashes, req.retry_failed)
    prefill = plan.prefill(listing, sources, positions)
    extra = {"prefilled": prefill.rows, "reused": prefill.rows - sum(p in listing.failures for p in positions.tolist())}
    if sources:
        extra.update(update=vars(plan.counts), update_notes=plan.notes)
        cache.check_space_for_update(req.out, len(listing) * dim * 4)
    return cache.PartialCache.create(
        target, {**meta, **settle(len(positions) - prefill.rows), **extra}, positions, [listing.paths[p] for p in positions], listing.labels[positions],
        None if listing.splits is None else [listing.splits[p] for p in positions], dim,
        sizes=listing.sizes[positions], mtime_ns=listing.mtime_ns[positions],
        extras={k: [v[p] for p in positions] for k, v in listing.extras.items()}, prefill=prefill)


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
    if _settings(old) != _settings(meta):
        if overwrite:
            return None
        shown = cache.describe_difference({**old, "listing_sha256": ""}, {**meta, "listing_sha256": ""})
        raise TransferError(f"{out} holds a different extraction ({shown}); "
                            "pass --overwrite to replace it, or choose another --out")
    return cache.cache_entries(out)


def _settings(meta: dict) -> dict:
    """The identity of an extraction without its listing: what decides whether results are reusable."""
    return {k: v for k, v in cache.identity(meta).items() if k != "listing_sha256"}


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
        reusable = not overwrite and _settings(old) == _settings(meta)
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


def _extract_rows(shard: cache.PartialCache, embedder: Embedder, root: str, paths: list[str], prep,
                  batch_size: int, workers: int, decode: str, reporter) -> tuple[int, float]:
    """Run every pending row of `shard` through the network; commit batch by batch. Returns the
    rows done and the seconds spent waiting for decoded images."""
    rows = shard.pending_rows().tolist()
    if not rows:
        return 0, 0.0
    cuda = embedder.device.type == "cuda"
    processed = 0
    in_flight = None  # GPU only: the previous batch, its features copied back while this one computes
    batches = decoding.batches(root, paths, rows, prep, batch_size, workers, embedder.device, decode)
    try:
        with shard:
            for batch in batches:
                features = embedder(batch.images)
                if not cuda:
                    processed += _commit(shard, batch, features, None, reporter)
                    continue
                host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
                host.copy_(features, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(features.device))
                if in_flight:
                    processed += _commit(shard, *in_flight, reporter)
                in_flight = (batch, host, ready)
            if in_flight:
                processed += _commit(shard, *in_flight, reporter)
    finally:
        batches.close()
    return processed, batches.wait_seconds


def _synthetic_forward(embedder: Embedder, size: int) -> Callable[[int], None]:
    """forward(n): the network once over n random uint8 images of size x size (the batch probe)."""
    images = torch.randint(0, 256, (max(devices.CPU_BATCH_CANDIDATES), 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return lambda n: embedder(images[:n])


def _earlier_run(req: ExtractRequest, partial: str, meta: dict) -> dict:
    """The recorded settings of an unfinished (else a finished) run of this same extraction, whatever
    its precision, so that `auto` settings keep them; {} when there is none, or with --overwrite.
    Only an unfinished run passes on its batch size (a resume redoes whole batches at the same
    boundaries)."""
    if req.overwrite:
        return {}

    def settings(m: dict) -> dict:  # an update of a changed folder keeps the precision too
        return {k: v for k, v in cache.identity(m).items() if k not in ("precision", "listing_sha256")}

    found = {}
    for path, unfinished in ((partial, True), (req.out, False)):
        try:
            old = cache.PartialCache.read_meta(path) if unfinished else cache.check_cache(path)
        except (OSError, KeyError, TransferError):
            continue
        if settings(old) == settings(meta):
            found[unfinished] = old
    if True in found and found[True].get("listing_sha256") == meta["listing_sha256"]:
        return found[True]  # the run this one resumes
    # Else the finished cache this run updates (an abandoned run of another listing only if none).
    old = found.get(False, found.get(True, {}))
    return {k: v for k, v in old.items() if k != "batch_size"}


def _agreed(dist: distributed.Dist, choice: devices.Choice) -> devices.Choice:
    """Under torchrun, one precision for every rank: their shards become one cache."""
    if dist.world_size == 1:
        return choice
    values = distributed.gather(dist, choice.value)
    return choice if len(set(values)) == 1 else devices.Choice(
        "fp32", f"the ranks resolved different precisions ({', '.join(values)}); all use fp32")


def _commit(shard: cache.PartialCache, batch, host: torch.Tensor, ready, reporter) -> int:
    if ready is not None:
        ready.synchronize()
    shard.commit(batch.indices.numpy(), host.numpy(), batch.failed, batch.hashes)
    n = len(batch.indices) + len(batch.failed)
    reporter.advance(n)
    return n

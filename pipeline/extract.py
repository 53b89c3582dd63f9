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

from . import cache, distributed
from .backbones import (PRECISIONS, Embedder, check_backbone_name, default_precision, load_backbone,
                        resolve_device)
from .errors import SettingError, TransferError
from .files import make_folder_for
from .images import ImageDataset, ImageListing, collate, scan_image_folder
from .settings import SEED, Interval, Options, validate_all


@dataclass
class ExtractRequest:
    """Every option of an extraction; `CONSTRAINTS` declares what each allows."""

    image_dir: str
    out: str
    backbone: str = "vgg16"
    weights: str | None = None  # torchvision weights name, state_dict file, or "random"
    batch_size: int | None = None  # default: 32 on CPU, 256 on GPU
    device: str = "auto"
    precision: str | None = None  # default: bf16 on GPU, fp32 on CPU
    workers: int | None = None  # decoding processes; default from the device and core count
    overwrite: bool = False
    seed: int = 0
    command: str = ""  # the command line, named in "resume with" messages

    CONSTRAINTS = {
        "batch_size": [None, Interval(Integral, 1, None)],
        "precision": [None, Options(tuple(PRECISIONS))],
        "workers": [None, Interval(Integral, 0, None)],
        "seed": SEED,
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


class ProgressSink:
    """Receives progress; the library never prints. `start` once, then `advance` per batch."""

    def start(self, total: int, already: int) -> None: ...

    def advance(self, images: int) -> None: ...


def extract(image_dir: str | os.PathLike, out: str | os.PathLike, *, progress: ProgressSink | None = None,
            on_ready: Callable[[dict], None] | None = None, **options) -> ExtractSummary:
    """Run a frozen pretrained network once over every image under `image_dir` and cache its
    features in `out` (HDF5; see docs/cache-format.md). Resumes an interrupted run of the same
    extraction; keeps a finished one. options: backbone, weights, batch_size, device, precision,
    workers, overwrite, seed (the `transfer extract` options).

    >>> summary = extract("photos/", "cache/photos.h5", backbone="efficientnet_lite0")
    >>> summary.done, summary.failures                        # images cached, (path, reason) of the rest
    """
    names = [f.name for f in fields(ExtractRequest)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise SettingError(f"unknown extract option {unknown[0]!r}; expected any of {', '.join(names[2:])}")
    return run_extract(ExtractRequest(os.fspath(image_dir), os.fspath(out), **options), progress, on_ready)


def run_extract(req: ExtractRequest, progress: ProgressSink | None = None,
                on_ready: Callable[[dict], None] | None = None) -> ExtractSummary:
    """Extract features for every image under req.image_dir into req.out (see docs/cache-format.md)."""
    started = time.perf_counter()
    _check_request(req)
    with distributed.session() as dist, distributed.name_rank_in_errors(dist, req.out):
        device = resolve_device(distributed.device_for(dist, req.device))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # streams, events and pinned copies all on this GPU
        precision = req.precision or default_precision(device)
        listing = scan_image_folder(req.image_dir)
        summary = ExtractSummary(
            out=req.out, state=ExtractState.WRITTEN, total=len(listing), done=0, failed=0, resumed_from=0, processed=0, seconds=0.0,
            images_per_second=0.0, out_bytes=0, skipped=listing.skipped, device=str(device),
            batch_size=req.batch_size or (256 if device.type == "cuda" else 32),
            workers=req.workers if req.workers is not None else _default_workers(device, dist.local_world_size),
            world_size=dist.world_size)
        sharded = dist.world_size > 1
        target = distributed.shard_path(req.out, dist)
        with cache.WriterLock(target if sharded else req.out):
            cache.remove_stale_temporaries(target, "creating")
            backbone = load_backbone(req.backbone, req.weights, req.seed)
            meta = {**_metadata(req, backbone, listing, precision), "world_size": dist.world_size}
            if _already_complete(req.out, meta, req.overwrite):
                return _finished(summary, ExtractState.ALREADY_COMPLETE, cache.read_cache(req.out), started)
            positions = distributed.my_positions(len(listing), dist)
            shard = _open_partial(target, meta, listing, positions, backbone.dim, req.overwrite)
            before = shard.progress()
            if on_ready:
                on_ready({"device": summary.device, "precision": precision, "batch_size": summary.batch_size,
                          "workers": summary.workers, "total": len(listing), "already": before.finished,
                          "rank": dist.rank, "world_size": dist.world_size, "partial": target})
            reporter = distributed.progress_reporter(dist, req.out, progress or ProgressSink(), len(listing))
            reporter.start(before.finished)
            loop_started = time.perf_counter()
            processed = _extract_rows(shard, Embedder(backbone, device, precision), listing.root,
                                      [listing.paths[p] for p in positions],
                                      backbone.preprocessing.pil_transform(), summary.batch_size, summary.workers,
                                      reporter)
            left = shard.progress()
            if left.finished != left.total:
                raise TransferError(f"{target}: {left.total - left.finished} rows still pending after the run")
            counts = distributed.finish(dist, req.out, reporter, {"already": before.finished, "processed": processed})
            loop_seconds = time.perf_counter() - loop_started
            if counts is None:  # not rank 0: rank 0 assembles
                summary.processed = processed
                return _finished(summary, ExtractState.SHARD_WRITTEN, None, started)
            summary.resumed_from = sum(c["already"] for c in counts)
            summary.processed = sum(c["processed"] for c in counts)
            summary.images_per_second = summary.processed / loop_seconds if loop_seconds > 0 else 0.0
            parts = distributed.all_parts(req.out, dist.world_size)
            with cache.WriterLock(req.out) if sharded else contextlib.nullcontext():
                info = cache.assemble(parts, req.out, meta)
                for part in parts:
                    os.remove(part)
    return _finished(summary, ExtractState.WRITTEN, info, started)


def _check_request(req: ExtractRequest) -> None:
    validate_all(vars(req), ExtractRequest.CONSTRAINTS)
    check_backbone_name(req.backbone)
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


def _metadata(req: ExtractRequest, backbone, listing: ImageListing, precision: str) -> dict:
    meta = {
        **backbone.provenance(),
        "precision": precision,
        "classes": listing.classes,
        "image_dir": os.path.abspath(listing.root),
        "image_dir_bytes": os.fsencode(os.path.abspath(listing.root)),  # exact, whatever the encoding
        "num_listed": len(listing),
        "listing_sha256": cache.listing_digest(listing.classes, listing.paths, listing.labels, listing.splits),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "pillow_version": PIL.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": req.command,
    }
    if backbone.name == "efficientnet_lite0":
        import timm

        meta["timm_version"] = timm.__version__
    return meta


def _already_complete(out: str, meta: dict, overwrite: bool) -> bool:
    """True when `out` already holds this very extraction; refuses to replace a different one."""
    if not os.path.exists(out):
        return False
    try:
        old = cache.check_cache(out)
    except TransferError as e:
        if overwrite:
            return False
        raise TransferError(f"{out} exists and is not a finished cache ({e}); pass --overwrite to replace it") from None
    if cache.identity(old) == cache.identity(meta):
        return True
    if overwrite:
        return False
    raise TransferError(f"{out} holds a different extraction ({cache.describe_difference(old, meta)}); "
                        "pass --overwrite to replace it, or choose another --out")


def _open_partial(path: str, meta: dict, listing: ImageListing, positions: np.ndarray, dim: int,
                  overwrite: bool) -> cache.PartialCache:
    """Resume `path` when it holds this same extraction; otherwise start it (or refuse)."""
    if os.path.isdir(path):
        raise TransferError(f"{path} is a folder where the partial cache file should go; move it away")
    if os.path.exists(path):
        try:
            old = cache.PartialCache.read_meta(path)
            same = cache.identity(old) == cache.identity(meta) and np.array_equal(
                cache.PartialCache(path).positions(), positions)
        except (OSError, KeyError):
            same, old = False, None  # damaged by something else (writes never leave it unreadable)
        if same:
            return cache.PartialCache(path)
        if not overwrite and old is not None:
            raise TransferError(f"{path} holds an unfinished extraction with other settings "
                                f"({cache.describe_difference(old, meta)}); rerun its own command to resume it "
                                f"({old.get('command') or 'unknown'}), or pass --overwrite to discard it")
        os.remove(path)
    return cache.PartialCache.create(
        path, meta, positions, [listing.paths[p] for p in positions], listing.labels[positions],
        None if listing.splits is None else [listing.splits[p] for p in positions], dim)


def _extract_rows(shard: cache.PartialCache, embedder: Embedder, root: str, paths: list[str], transform,
                  batch_size: int, workers: int, reporter) -> int:
    """Run every pending row of `shard` through the network; commit batch by batch. Returns rows done."""
    rows = shard.pending_rows().tolist()
    if not rows:
        return 0
    cuda = embedder.device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        ImageDataset(root, paths, rows, transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
    )
    processed = 0
    in_flight = None  # GPU only: the previous batch, its features copied back while this one computes
    batches = iter(loader)  # fork the decoding workers before the cache file is opened for writing
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
    return processed


def _commit(shard: cache.PartialCache, batch, host: torch.Tensor, ready, reporter) -> int:
    if ready is not None:
        ready.synchronize()
    shard.commit(batch.indices.numpy(), host.numpy(), batch.failed)
    n = len(batch.indices) + len(batch.failed)
    reporter.advance(n)
    return n

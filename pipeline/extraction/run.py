"""Stage 1, wired: images -> frozen backbone -> feature cache, resumable, one or many processes.

`run_extract` only composes the parts: `plan` decides what will run, `decode` turns files into
batches of crops, the `Embedder` computes, `cache` writes. Under torchrun, `distributed` gives each
rank its slice and rank 0 assembles the shards.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from .. import cache, devices
from ..backbones import Embedder
from ..errors import Interrupted, SettingError, TransferError
from ..files import display_path, size_text
from ..progress import resolve
from . import decode as decoding
from . import distributed, webdataset
from .plan import ExtractPlan, ExtractRequest, make_plan


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
    processed: int  # images this run went through (failed ones included)
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
    failed_now: int = 0  # of the images this run went through, those that failed (decoding, preprocessing)
    setup_seconds: float = 0.0  # before the loop: listing, loading the network, the batch-size probe
    loop_seconds: float = 0.0  # the extraction loop: decode -> network -> commit (images_per_second's time)
    batch_probed: bool = False  # whether the setup included a batch-size probe

    @property
    def wait_share(self) -> float:
        """The share of the extraction loop spent waiting for decoded images."""
        return self.input_seconds * self.images_per_second / self.processed if self.processed else 0.0

    def lines(self) -> list[str]:
        """What the run did, in a few lines for the user."""
        out = display_path(self.out)
        if self.state is ExtractState.SHARD_WRITTEN:
            return []
        if self.state is ExtractState.ALREADY_COMPLETE:
            retry = "; --retry-failed runs the failed images again" if self.failed else ""
            return [f"{out} already holds this extraction ({self.done} images, {self.failed} failed); "
                    f"nothing to do (delete it to extract again{retry})"]
        before = ([f"resumed after {self.resumed_from}"] if self.resumed_from else []) + (
            [f"reused {self.reused}"] if self.reused else [])
        resumed = f" ({', '.join(before)})" if before else ""
        # Files that failed to decode are not counted as extracted, nor in the rate.
        extracted = self.processed - self.failed_now
        rate = self.images_per_second * extracted / self.processed if self.processed else 0.0
        lines = [f"extracted {extracted} images{resumed} in {self.seconds:.1f} s: {self.done} cached, "
                 f"{self.failed} failed"]
        if self.processed:
            # The rate is over the loop only; the seconds above also hold the set-up and the cache's assembly.
            setup = "loading the network" + (" and probing the batch size" if self.batch_probed else "")
            after = max(self.seconds - self.setup_seconds - self.loop_seconds, 0.0)
            lines.append(f"speed: {rate:.1f} img/s over the {self.loop_seconds:.1f} s of the "
                         f"extraction loop ({self.wait_share:.0%} of it waiting for decoded images); before it "
                         f"{self.setup_seconds:.1f} s {setup}, after it {after:.1f} s writing the cache")
        lines.append(f"cache: {out} ({size_text(self.out_bytes)})")
        by_reason: dict[str, list[str]] = {}
        for path, reason in self.skipped:
            by_reason.setdefault(reason, []).append(path)
        for reason, paths in by_reason.items():
            more = f", ... ({len(paths)} in all)" if len(paths) > 3 else ""
            lines.append(f"skipped ({reason}): {', '.join(paths[:3])}{more}")
        if self.failures:
            lines.append("failed images (kept in the cache's 'failed' group):")
            lines += [f"  {path}: {reason}" for path, reason in self.failures[:10]]
            if len(self.failures) > 10:
                lines.append(f"  ... and {len(self.failures) - 10} more")
        return lines


def extract(image_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
            progress="auto", on_ready: Callable[[ExtractPlan], None] | None = None, **options) -> ExtractSummary:
    """Run a frozen pretrained network once over every image under `image_dir` (or listed in
    `manifest=`, a .csv/.jsonl of path,label[,split]) and cache its features in `out` (HDF5; see
    docs/cache-format.md). Resumes an interrupted run of the same extraction; keeps a finished one;
    updates a cache of the same settings whose images changed, running the network only on new and
    changed files. options: backbone, weights, layer, tta, batch_size, device, precision,
    decode, workers, overwrite, seed, manifest, check_content, retry_failed, preprocessing (the
    `transfer extract` options). progress: True for bars, False for none, "auto" (bars when
    interactive), or a progress.Progress (see pipeline.progress). `on_ready(plan)` is called once before the network runs with the
    ExtractPlan (device, precision, batch size, and for an update, plan.update's account).

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


def run_extract(req: ExtractRequest, progress=None,
                on_ready: Callable[[ExtractPlan], None] | None = None) -> ExtractSummary:
    """Extract features for every image under req.image_dir into req.out (see docs/cache-format.md)."""
    started = time.perf_counter()
    progress = resolve(progress)
    req.check()
    try:
        return _run(req, progress, on_ready, started)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {committed_so_far(req.out)}rerun the same command to resume") from None
    finally:
        progress.close()


def _run(req: ExtractRequest, progress, on_ready, started: float) -> ExtractSummary:
    with devices.session() as place, distributed.name_rank_in_errors(place, req.out):
        sharded = place.world_size > 1
        with cache.WriterLock(distributed.shard_path(req.out, place) if sharded else req.out):
            plan = make_plan(req, place)
            summary = ExtractSummary(
                out=req.out, state=ExtractState.WRITTEN, total=plan.total, done=0, failed=0, resumed_from=0,
                processed=0, seconds=0.0, images_per_second=0.0, out_bytes=0, skipped=plan.listing.skipped,
                device=str(plan.device), workers=plan.workers, world_size=place.world_size,
                precision=plan.precision.value, decode=plan.decode.value, notes=plan.notes)
            if plan.partial is None:
                return _finished(summary, ExtractState.ALREADY_COMPLETE, cache.read_cache(req.out), started)
            summary.batch_size, summary.update = plan.batch.value, plan.update
            if place.leads:
                for line in plan.lines():
                    progress.note(line)
            if on_ready:
                on_ready(plan)
            reporter = distributed.progress_reporter(place, req.out, progress, plan.total)
            reporter.start(plan.already)
            loop_started = time.perf_counter()
            shards = None
            if isinstance(plan.listing, webdataset.ShardListing):  # tar members, read shard by shard
                shards = functools.partial(webdataset.batches, plan.listing, plan.positions)
            failed_before = plan.partial.progress().failed
            summary.setup_seconds = loop_started - started
            summary.batch_probed = plan.batch.why.startswith("probed")
            processed, summary.input_seconds = _extract_rows(
                plan.partial, plan.embedder, plan.listing.root, [plan.listing.paths[p] for p in plan.positions],
                plan.backbone.preprocessing, plan.batch.value, plan.workers, plan.decode.value, reporter, shards)
            left = plan.partial.progress()
            if left.finished != left.total:
                raise TransferError(f"{plan.target}: {left.total - left.finished} rows still pending after the run")
            counts = distributed.finish(place, req.out, reporter, {"already": plan.resumed, "processed": processed,
                                                                   "reused": plan.reused,
                                                                   "failed": left.failed - failed_before})
            loop_seconds = time.perf_counter() - loop_started
            if counts is None:  # not rank 0: rank 0 assembles
                summary.processed = processed
                return _finished(summary, ExtractState.SHARD_WRITTEN, None, started)
            summary.resumed_from = sum(c["already"] for c in counts)
            summary.processed = sum(c["processed"] for c in counts)
            summary.reused = sum(c["reused"] for c in counts)
            summary.failed_now = sum(c["failed"] for c in counts)
            summary.images_per_second = summary.processed / loop_seconds if loop_seconds > 0 else 0.0
            summary.loop_seconds = loop_seconds
            parts = distributed.all_parts(req.out, place.world_size)
            with cache.WriterLock(req.out) if sharded else contextlib.nullcontext():
                info = cache.assemble(parts, req.out, plan.meta)
                for part in parts:
                    os.remove(part)
    return _finished(summary, ExtractState.WRITTEN, info, started)


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
    partial = distributed.shard_path(out, devices.this_process())
    if not os.path.exists(partial):
        return ""
    p = cache.PartialCache(partial).progress()
    return f"{p.finished} of {p.total} images are committed in {display_path(partial)}; "


def _extract_rows(shard: cache.PartialCache, embedder: Embedder, root: str, paths: list[str], prep,
                  batch_size: int, workers: int, decode: str, reporter, shards=None) -> tuple[int, float]:
    """Run every pending row of `shard` through the network; commit batch by batch. Returns the
    rows done and the seconds spent waiting for decoded images. shards: for tar members,
    (rows, prep, batch_size, workers, device) -> batches (webdataset.batches)."""
    rows = shard.pending_rows().tolist()
    if not rows:
        return 0, 0.0
    cuda = embedder.device.type == "cuda"
    processed = 0
    in_flight = None  # GPU only: the previous batch, its features copied back while this one computes
    if shards is not None:
        batches = shards(rows, prep, batch_size, workers, embedder.device)
    else:
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


def _commit(shard: cache.PartialCache, batch, host: torch.Tensor, ready, reporter) -> int:
    if ready is not None:
        ready.synchronize()
    shard.commit(batch.indices.numpy(), host.numpy(), batch.failed, batch.hashes)
    n = len(batch.indices) + len(batch.failed)
    reporter.advance(n)
    return n

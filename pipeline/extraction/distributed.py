"""Extraction across processes, GPUs and machines under torchrun: who does which rows, and the end.

Each rank takes a disjoint contiguous slice of the image listing (no padding, unlike
DistributedSampler, whose repeated samples would duplicate rows), writes its own shard file in the
partial-cache format, and rank 0 assembles the shards into one cache in listing order. A single
process is simply rank 0 of 1 (`devices.this_process`). The process group (gloo, `devices.session`)
carries only the final barrier: the features go through the shared file system, so no GPU
collective is needed.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch.distributed as tdist

from .. import cache
from ..devices import Place
from ..errors import TransferError

POLL_SECONDS = 0.5


def my_positions(n: int, d: Place) -> np.ndarray:
    """Listing positions of this rank: the contiguous slice [n*r/W, n*(r+1)/W)."""
    return np.arange(n * d.rank // d.world_size, n * (d.rank + 1) // d.world_size, dtype=np.int64)


def shard_path(out: str, d: Place) -> str:
    """This rank's partial file: OUT.partial for a single process."""
    return cache.shard_path_of(out, d.rank, d.world_size)


def all_parts(out: str, world: int) -> list[str]:
    return [cache.shard_path_of(out, r, world) for r in range(world)]


@contextlib.contextmanager
def name_rank_in_errors(d: Place, out: str):
    """Under torchrun, every error of this rank names the rank and its shard file."""
    try:
        yield
    except TransferError as e:
        if d.world_size <= 1:
            raise
        raise type(e)(f"rank {d.rank} of {d.world_size} (shard {cache.display_path(shard_path(out, d))}): {e}") from None


class _Reporter:
    """Feeds one progress bar for the whole job (a progress.Progress): rank 0 adds up every shard's
    committed rows."""

    def __init__(self, d: Place, out: str, sink, total: int):
        self.d, self.parts, self.sink, self.total = d, all_parts(out, d.world_size), sink, total
        self.shown = 0
        self.last_poll = 0.0

    def start(self, already: int) -> None:
        if self.d.rank == 0:
            self.shown = already if self.d.world_size == 1 else self._committed()
            self.sink.phase("extract", self.total, "img", done=self.shown)

    def advance(self, n: int) -> None:
        if self.d.rank != 0:
            return
        if self.d.world_size == 1:
            self.shown += n
            self.sink.advance(n)
        else:
            self.poll(force=False)

    def poll(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self.last_poll < POLL_SECONDS:
            return
        self.last_poll = now
        committed = self._committed()
        if committed > self.shown:
            self.sink.advance(committed - self.shown)
            self.shown = committed

    def _committed(self) -> int:
        total = 0
        for part in self.parts:
            try:
                total += cache.PartialCache(part).progress().finished
            except (OSError, KeyError):
                pass  # not created yet by its rank
        return total


def progress_reporter(d: Place, out: str, sink, total: int) -> _Reporter:
    return _Reporter(d, out, sink, total)


def finish(d: Place, out: str, reporter: _Reporter, counts: dict) -> list[dict] | None:
    """Wait for every rank; rank 0 gets every rank's `counts` (in rank order), other ranks None."""
    if d.world_size == 1:
        return [counts]
    try:
        work = tdist.barrier(async_op=True)
        while not work.is_completed():  # rank 0 keeps the one progress line moving meanwhile
            if d.rank == 0:
                reporter.poll(force=True)
            time.sleep(POLL_SECONDS)
        work.wait()
        gathered = [None] * d.world_size
        tdist.all_gather_object(gathered, counts)
    except RuntimeError:  # gloo: a peer went away
        raise TransferError(f"another rank failed before finishing (see its own error); this rank's shard "
                            f"{shard_path(out, d)} is complete and kept: rerun the same command to resume") from None
    if d.rank != 0:
        return None
    for rank, part in enumerate(all_parts(out, d.world_size)):
        try:
            p = cache.PartialCache(part).progress()
        except (OSError, KeyError):
            raise TransferError(f"rank {rank}: its shard {part} is missing or unreadable; rerun to redo it") from None
        if p.finished != p.total:
            raise TransferError(f"rank {rank}: its shard {part} is incomplete ({p.finished}/{p.total}); "
                                "rerun the same command to resume it")
    reporter.poll(force=True)
    return gathered

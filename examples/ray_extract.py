"""Feature extraction on Ray Data: the engine schedules, transfer embeds and merges.

    python examples/ray_extract.py IMAGE_DIR --out CACHE.h5 [--workers N] [--gpus-per-worker 1]
        [--address auto] [--backbone ...] [--weights ...] [--layer ...] [--tta ...] [--precision ...]
        [--preprocessing ...] [--batch-size B]

IMAGE_DIR is listed as `transfer extract` lists it (classes, splits, order); the listed files go
through `ray.data.read_binary_files` -> `map_batches` on a pool of N actors (each loads the network
once: `pipeline.Embedder`) -> one part cache per batch, written by the actor that embedded it
(`pipeline.write_cache` with that Embedder's provenance: the precision it really ran at) ->
`pipeline.merge_caches` -> CACHE.h5, the cache `transfer extract IMAGE_DIR` writes (same rows,
labels, splits, failures, provenance; features within float rounding). `transfer fit CACHE.h5`
and export then work as usual. Undecodable images become failed rows; a worker never crashes on
one. Without --address a local Ray instance is started on this machine's cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from pipeline.images import scan_image_folder  # noqa: E402

READ_CPUS = 0.5
EXTRACT_OPTIONS = ("backbone", "weights", "layer", "tta", "precision", "preprocessing", "device", "seed")


class EmbedToParts:
    """A Ray actor: embeds each batch with its own `pipeline.Embedder` and writes it as one part."""

    def __init__(self, options: dict, parts: str, listed: dict, classes: list[str], image_dir: str, command: str):
        self.embed = pipeline.Embedder(**options)
        self.parts, self.listed, self.classes = parts, listed, classes
        self.meta = {"image_dir": image_dir, "image_dir_bytes": os.fsencode(image_dir), "command": command}

    def __call__(self, batch: dict) -> dict:
        out = self.embed(batch)
        rel = [self.listed[os.path.abspath(p)] for p in batch["path"]]  # (path, label, split) as extract lists it
        names = [r[0] for r in rel]
        # Named by its files: a retried batch rewrites its own part, never a second copy.
        part = os.path.join(self.parts, "part-" + hashlib.sha256("\0".join(names).encode()).hexdigest()[:16] + ".h5")
        splits = None if rel[0][2] is None else [r[2] for r in rel]
        pipeline.write_cache(part, out["embedding"], np.array([r[1] for r in rel]), classes=self.classes,
                             split=splits, paths=names, failed=out["error"], overwrite=True,
                             provenance={**self.embed.provenance(), **self.meta})
        return {"part": np.array([part]), "rows": np.array([len(names)]),
                "failed": np.array([int((out["error"] != "").sum())])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=1, help="actors, each with its own network")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="default: 1 with GPUs, else the cores left after reading, shared by the workers")
    parser.add_argument("--address", default=None, help="a running Ray cluster (auto, ray://...); default: local")
    parser.add_argument("--num-cpus", type=int, default=None, help="cores of the local Ray instance")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (and per part)")
    parser.add_argument("--keep-parts", default=None, help="keep the parts in this folder (default: removed)")
    parser.add_argument("--overwrite", action="store_true")
    for name in EXTRACT_OPTIONS:
        parser.add_argument("--" + name, default={"backbone": "vgg16", "tta": "none", "precision": "auto",
                                                  "device": "auto", "seed": 0}.get(name),
                            type=int if name == "seed" else str)
    args = parser.parse_args(argv)
    import ray  # here: the recipe's only engine dependency (pip install "ray[data]")

    started = time.perf_counter()
    listing = scan_image_folder(args.image_dir)
    image_dir = os.path.abspath(args.image_dir)
    files = [os.path.join(image_dir, p) for p in listing.paths]
    listed = {f: (p, int(y), None if listing.splits is None else listing.splits[i])
              for i, (f, p, y) in enumerate(zip(files, listing.paths, listing.labels))}
    options = {name: getattr(args, name) for name in EXTRACT_OPTIONS}
    if args.address is None:  # a local instance: its workers import this checkout's pipeline
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(address=args.address, num_cpus=args.num_cpus if args.address is None else None,
             include_dashboard=False, log_to_driver=False)
    ready = time.perf_counter()
    # Reading takes half a core; the actors share the rest. Ray Data holds back a read that would
    # take the job past the cluster's cores, so reads and actors must fit together (else: a stall).
    cpus = args.cpus_per_worker or (1 if args.gpus_per_worker else
                                    max(0.25, (ray.cluster_resources().get("CPU", 1) - READ_CPUS) / args.workers))
    parts = args.keep_parts or tempfile.mkdtemp(prefix="ray-parts-", dir=os.path.dirname(os.path.abspath(args.out)))
    os.makedirs(parts, exist_ok=True)
    try:
        written = ray.data.read_binary_files(files, include_paths=True,
                                             ray_remote_args={"num_cpus": READ_CPUS}).map_batches(
            EmbedToParts, fn_constructor_kwargs=dict(options=options, parts=parts, listed=listed,
                                                     classes=listing.classes, image_dir=image_dir,
                                                     command=" ".join(sys.argv)),
            compute=ray.data.ActorPoolStrategy(size=args.workers), num_gpus=args.gpus_per_worker, num_cpus=cpus,
            batch_size=args.batch_size, batch_format="numpy").take_all()
        embedded = time.perf_counter()
        names = sorted({r["part"] for r in written})
        merged = pipeline.merge_caches(names, args.out, overwrite=args.overwrite)
    finally:
        if args.keep_parts is None:
            shutil.rmtree(parts, ignore_errors=True)
        ray.shutdown()
    seconds = time.perf_counter() - started
    print(f"ray: {len(files)} images in {seconds:.1f} s ({ready - started:.1f} s starting Ray), "
          f"{len(files) / (embedded - ready):.1f} img/s over {args.workers} workers; {len(names)} parts merged: "
          f"{merged.n} cached, {len(merged.failed)} failed -> {args.out}")


if __name__ == "__main__":
    main()

"""Feature extraction on Spark with `predict_batch_udf`: Spark schedules, transfer embeds and merges.

    python examples/spark_extract.py IMAGE_DIR --out CACHE.h5 [--master local[4]] [--partitions N]
        [--backbone ...] [--weights ...] [--layer ...] [--tta ...] [--precision ...] [--preprocessing ...]

IMAGE_DIR is listed as `transfer extract` lists it; its files are read by Spark's `binaryFile`
source, and `pyspark.ml.functions.predict_batch_udf` runs `pipeline.Embedder` on numpy batches of
their bytes (the network loaded once per Python worker) -> (embedding, error) per row. The rows
come back to the driver part by part (`pipeline.write_cache`), and `pipeline.merge_caches` puts
them in extract's order: CACHE.h5 is the cache `transfer extract IMAGE_DIR` writes. The precision
is resolved once here and pinned for the executors, so the cache records what they ran.
Needs Java (Spark's JVM) and `pip install pyspark`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from pipeline.images import scan_image_folder  # noqa: E402

EXTRACT_OPTIONS = ("backbone", "weights", "layer", "tta", "precision", "preprocessing", "device", "seed")
PART_ROWS = 4096  # rows per part written by the driver


def make_predict_fn(options: dict):
    """What predict_batch_udf calls once per Python worker: load the network, return predict."""
    def load():
        embed = pipeline.Embedder(**options)

        def predict(content: np.ndarray) -> dict:
            out = embed({"bytes": content})
            return {"embedding": out["embedding"], "error": out["error"].astype(str)}
        return predict
    return load


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--master", default="local[2]", help="Spark master (default: local[2])")
    parser.add_argument("--partitions", type=int, default=None, help="default: Spark's")
    parser.add_argument("--batch-size", type=int, default=16, help="images per predict call")
    parser.add_argument("--overwrite", action="store_true")
    for name in EXTRACT_OPTIONS:
        parser.add_argument("--" + name, default={"backbone": "vgg16", "tta": "none", "precision": "auto",
                                                  "device": "auto", "seed": 0}.get(name),
                            type=int if name == "seed" else str)
    args = parser.parse_args(argv)
    from pyspark.ml.functions import predict_batch_udf  # here: the recipe's engine (pip install pyspark)
    from pyspark.sql import SparkSession
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

    started = time.perf_counter()
    listing = scan_image_folder(args.image_dir)
    image_dir = os.path.abspath(args.image_dir)
    files = [os.path.join(image_dir, p) for p in listing.paths]
    listed = {f: i for i, f in enumerate(files)}
    options = {name: getattr(args, name) for name in EXTRACT_OPTIONS}
    here = pipeline.Embedder(**options)
    meta = {**here.provenance(), "image_dir": image_dir, "image_dir_bytes": os.fsencode(image_dir),
            "command": " ".join(sys.argv)}
    options["precision"] = meta["precision"]  # what the cache records is what the executors run
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master(args.master).appName("transfer-extract")
             .config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    ready = time.perf_counter()
    parts = tempfile.mkdtemp(prefix="spark-parts-", dir=os.path.dirname(os.path.abspath(args.out)))
    try:
        embed = predict_batch_udf(make_predict_fn(options), batch_size=args.batch_size, return_type=StructType([
            StructField("embedding", ArrayType(FloatType())), StructField("error", StringType())]))
        df = spark.read.format("binaryFile").load(files)
        if args.partitions:
            df = df.repartition(args.partitions)
        rows = df.select("path", embed("content").alias("out")).select("path", "out.embedding", "out.error")
        names, chunk = [], []
        for row in rows.toLocalIterator():
            chunk.append(row)
            if len(chunk) == PART_ROWS:
                names.append(_write_part(chunk, parts, len(names), listing, listed, meta, here.dim))
                chunk = []
        if chunk:
            names.append(_write_part(chunk, parts, len(names), listing, listed, meta, here.dim))
        embedded = time.perf_counter()
        merged = pipeline.merge_caches(names, args.out, overwrite=args.overwrite)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
        spark.stop()
    seconds = time.perf_counter() - started
    print(f"spark: {len(files)} images in {seconds:.1f} s ({ready - started:.1f} s starting Spark), "
          f"{len(files) / (embedded - ready):.1f} img/s on {args.master}; {len(names)} parts merged: "
          f"{merged.n} cached, {len(merged.failed)} failed -> {args.out}")


def _write_part(rows: list, folder: str, k: int, listing, listed: dict, meta: dict, dim: int) -> str:
    index = [listed[os.path.abspath(unquote(urlparse(r["path"]).path))] for r in rows]  # file:/a/b.jpg -> /a/b.jpg
    errors = np.array([r["error"] or "" for r in rows], dtype=object)
    features = np.array([r["embedding"] if r["embedding"] is not None else [np.nan] * dim for r in rows],
                        dtype=np.float32)
    part = os.path.join(folder, f"part-{k:05d}.h5")
    pipeline.write_cache(part, features, listing.labels[index], classes=listing.classes, failed=errors,
                         split=None if listing.splits is None else [listing.splits[i] for i in index],
                         paths=[listing.paths[i] for i in index], provenance=meta)
    return part


if __name__ == "__main__":
    main()

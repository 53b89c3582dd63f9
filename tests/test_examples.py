"""examples/ray_extract.py and examples/spark_extract.py: the engines' recipes write the cache
`transfer extract` writes (rows, labels, splits, failures, provenance; fp32 cosine >= 0.999999),
and fit + export on it pass parity. Each runs in a subprocess (an engine's workers, a JVM)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import pipeline
from pipeline import read_cache
from pipeline.cache import identity
from tests.conftest import HYMENOPTERA, LITE, ROOT, needs_hymenoptera, run_cli


def run_example(name: str, *args, timeout: int = 400) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, time.perf_counter() - started


def assert_same_cache(got, single) -> None:
    assert identity(got.provenance) == identity(single.provenance)  # backbone, weights, precision, listing, ...
    assert got.classes == single.classes and got.image_dir == single.image_dir
    assert got.path_bytes == single.path_bytes and np.array_equal(got.labels, single.labels)
    assert (got.split is None and single.split is None) or list(got.split) == list(single.split)
    assert got.failed == single.failed
    a, b = got.features(), single.features()
    assert ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min() >= 0.999999


@needs_hymenoptera
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'ray[data]')")
def test_ray_recipe_over_20_real_photos_writes_extracts_cache_and_fit_export_pass_parity(tmp_path, capsys):
    photos = tmp_path / "photos"
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            (photos / split / cls).mkdir(parents=True)
            for f in sorted((HYMENOPTERA / split / cls).iterdir())[:5]:
                (photos / split / cls / f.name).symlink_to(f)
    single, merged, parts = tmp_path / "single.h5", tmp_path / "ray.h5", tmp_path / "parts"
    started = time.perf_counter()
    result = run_cli("extract", photos, "--out", single, "--backbone", "efficientnet_lite0", "--precision", "fp32")
    extract_seconds = time.perf_counter() - started
    assert result.code == 0, result.err
    proc, ray_seconds = run_example("ray_extract.py", photos, "--out", merged, "--workers", 2, "--num-cpus", 2,
                                    "--backbone", "efficientnet_lite0", "--precision", "fp32", "--batch-size", 5,
                                    "--keep-parts", parts)
    assert "20 cached, 0 failed" in proc.stdout
    with capsys.disabled():  # the two timings side by side, same run, same photos
        print(f"\ntransfer extract: 20 images in {extract_seconds:.1f} s ({20 / extract_seconds:.1f} img/s); "
              f"ray_extract.py: {ray_seconds:.1f} s wall ({20 / ray_seconds:.1f} img/s); "
              f"{proc.stdout.strip().splitlines()[-1]}")
    assert_same_cache(read_cache(merged), read_cache(single))
    fitted = run_cli("fit", merged, "--out", tmp_path / "run")  # with the default export: parity is checked
    assert fitted.code == 0, fitted.err
    assert "parity: model.pt on" in fitted.out
    on_parts = pipeline.fit(sorted(map(str, parts.glob("*.h5"))), solver="streamed", C=1.0)
    on_merged = pipeline.fit(str(merged), solver="streamed", C=1.0)
    np.testing.assert_array_equal(on_parts.head.weight, on_merged.head.weight)


def _java_runs() -> bool:
    java = shutil.which("java")
    return java is not None and subprocess.run([java, "-version"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _java_runs(), reason="no working Java here (Spark runs on a JVM)")
@pytest.mark.skipif(importlib.util.find_spec("pyspark") is None,
                    reason="pyspark is not installed (pip install '.[spark]': about 320 MB)")
def test_spark_recipe_writes_extracts_cache(tiny_lite0, tmp_path):
    root, out = tiny_lite0
    merged = tmp_path / "spark.h5"
    proc, _ = run_example("spark_extract.py", root, "--out", merged, *LITE, "--precision", "fp32", "--batch-size", 4,
                          timeout=500)
    assert "12 cached, 1 failed" in proc.stdout
    assert_same_cache(read_cache(merged), read_cache(out))

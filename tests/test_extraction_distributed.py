"""pipeline/extraction/distributed.py: `torchrun --nproc-per-node=2` (gloo, CPU) writes the same cache as one
process; a rank killed mid-run is finished by rerunning the same command."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline import cache, read_cache
from pipeline.cache import shard_path_of
from pipeline.devices import Place
from pipeline.extraction.distributed import my_positions
from tests.conftest import ROOT, make_folder, run_cli

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
ARGS = ("--backbone", "efficientnet_lite0", "--weights", "random", "--batch-size", "4")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")


def torchrun(images: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node=2", str(ROOT / "cli.py"), "extract",
                             str(images), "--out", str(out), *ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


def contents(path: Path):
    c = read_cache(path)
    return (c.path_bytes, c.labels, c.features(), [p for p, _ in c.failed], [r for _, r in c.failed], list(c.split))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("dist") / "images", {"a": 9, "b": 8}, splits=("train", "val"))
    (root / "val" / "b" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def single(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "one.h5"
    assert run_cli("extract", images, "--out", out, *ARGS).code == 0
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    pa, la, fa, xa, ra, sa = contents(a)
    pb, lb, fb, xb, rb, sb = contents(b)
    assert pa == pb and sa == sb and np.array_equal(la, lb)
    assert xa == xb and ra == rb == ["not a recognised image format"]
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)


def test_slices_are_disjoint_contiguous_and_cover_everything_without_padding():
    for n in (0, 1, 7, 35, 1000):
        for world in (1, 2, 3, 8):
            slices = [my_positions(n, Place(r, world)) for r in range(world)]
            assert np.array_equal(np.concatenate(slices), np.arange(n))


@pytest.mark.slow
def test_two_ranks_assemble_the_cache_one_process_writes(images, single, tmp_path):
    out = tmp_path / "two.h5"
    proc = torchrun(images, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert_same_cache(single, out)
    assert stdout.count("extracted ") == 1 and "extracted 34 images" in stdout and "34 cached, 1 failed" in stdout  # one summary, for the whole job
    assert "2 ranks" in stderr and "35/35" in stderr  # one progress line, rank 0 adding up both shards
    assert not list(tmp_path.glob("two.h5.*"))  # shards and locks are gone


@pytest.mark.slow
def test_a_killed_rank_leaves_no_cache_and_a_rerun_finishes_the_job(images, single, tmp_path):
    out = tmp_path / "two.h5"
    shard = Path(shard_path_of(str(out), 1, 2))
    proc = torchrun(images, out)
    rank1 = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if shard.exists() and cache.PartialCache(str(shard)).progress().finished >= 4:
            break
        time.sleep(0.01)
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == "1":
                rank1 = child
        except psutil.Error:
            pass
    assert rank1 is not None
    rank1.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not out.exists()  # nothing that looks complete
    assert shard.exists() and cache.PartialCache(str(shard)).progress().finished >= 4  # the dead rank's work is kept
    rerun = torchrun(images, out)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "resumed after" in stdout
    assert_same_cache(single, out)


@pytest.mark.slow
def test_a_failing_rank_is_named_with_its_shard(images, tmp_path):
    out = tmp_path / "two.h5"
    Path(shard_path_of(str(out), 1, 2)).mkdir()  # rank 1 cannot create its shard file
    proc = torchrun(images, out)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error: rank" in line]
    assert any(f"error: rank 1 of 2 (shard {shard_path_of(str(out), 1, 2)})" in e for e in errors), stderr
    assert not out.exists()

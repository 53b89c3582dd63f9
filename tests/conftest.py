"""Shared fixtures: tiny generated image folders, the real photos in ../shared, and a CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"

needs_hymenoptera = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"real photos not found at {HYMENOPTERA}")


def write_image(path: Path, seed: int, size=(48, 36), fmt: str | None = None) -> Path:
    """A small smooth colour image, different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-3, 3, size=(2, 3))
    pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path, format=fmt)
    return path


def make_folder(root: Path, counts: dict, splits: tuple[str, ...] | None = None, ext: str = ".png") -> Path:
    """counts: {class: n images}; with splits, each split gets that many per class."""
    seed = 0
    for split in splits or (None,):
        for cls, n in counts.items():
            for i in range(n):
                folder = root / cls if split is None else root / split / cls
                write_image(folder / f"img{i:03d}{ext}", seed)
                seed += 1
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """6 images in 2 classes, no split folders."""
    return make_folder(tmp_path / "images", {"cat": 3, "dog": 3})


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def run_cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
            subprocess_: bool = False) -> Result:
    """Run the CLI as `transfer ARGS`: in this process by default (torch imports cost ~5 s per
    process), or as `python cli.py ARGS` in a subprocess where a test needs a real process."""
    args = [str(a) for a in args]
    if subprocess_:
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                              cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=timeout)
        return Result(proc.returncode, proc.stdout, proc.stderr)
    import cli

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    os.environ.update(env or {})
    sys.argv = [str(ROOT / "cli.py"), *args]  # as `python cli.py ARGS` would see it
    code = 0
    try:
        os.chdir(cwd or saved_cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """A failure the guide's way: non-zero exit, exactly one `error:` line, no traceback."""
    assert result.code != 0, result.out + result.err
    assert "Traceback" not in result.err, result.err
    assert len(result.error_lines) == 1, result.err
    line = result.error_lines[0]
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture(scope="session")
def hymenoptera_lite0(tmp_path_factory) -> Path:
    """The real photos through the real pretrained EfficientNet-Lite0, extracted once per session."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real photos not found at {HYMENOPTERA}")
    out = tmp_path_factory.mktemp("hym") / "hymenoptera_lite0.h5"
    result = run_cli("extract", HYMENOPTERA, "--out", out, "--backbone", "efficientnet_lite0", subprocess_=True)
    assert result.code == 0, result.err
    return out


def make_cache(path: Path, features: np.ndarray, labels: np.ndarray, classes: list[str],
               splits: list[str] | None = None) -> Path:
    """A finished cache holding the given features, written with the public `write_cache`."""
    from pipeline import write_cache

    paths = [f"{'' if splits is None else splits[i] + '/'}{classes[labels[i]]}/{i:05d}.png" for i in range(len(labels))]
    write_cache(path, features, labels, classes=classes, split=splits, paths=paths,
                provenance={"backbone": "synthetic", "weights": "none", "layer": "synthetic", "precision": "fp32",
                            "image_dir": str(path.parent / "images"),
                            "command": f"transfer extract images --out {path}"})
    return path


def blobs(n_per_class: int, n_classes: int, dim: int, seed: int = 0, spread: float = 1.0):
    """Gaussian clusters: features (n, dim) float32 and labels (n,) int64, classes c0..cK-1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = centres[labels] + rng.normal(0, spread, size=(len(labels), dim))
    return features.astype(np.float32), labels, [f"c{i}" for i in range(n_classes)]


def subset_cache(src: Path, dst: Path, rows: np.ndarray, keep_split: bool = False) -> Path:
    """A new finished cache with some rows of `src` (same provenance, paths and image folder)."""
    from pipeline import read_cache, write_cache

    source = read_cache(src)
    kept = {k: v for k, v in source.provenance.items()
            if k not in ("state", "num_images", "num_failed", "num_listed", "assembled", "format", "format_version",
                         "listing_sha256", "classes", "dim")}
    write_cache(dst, source.features(rows), source.labels[rows], classes=source.classes,
                split=source.split[rows] if keep_split and source.split is not None else None,
                paths=[os.fsdecode(source.path_bytes[i]) for i in rows], provenance=kept)
    return dst


LITE = ("--backbone", "efficientnet_lite0", "--weights", "random")


def fitted_run(tmp_path: Path, classes: dict, name: str) -> Path:
    """Images -> extract (random Lite0) -> fit with export; returns the run folder."""
    images = make_folder(tmp_path / f"{name}-images", classes, splits=("train", "val", "test"))
    cache = tmp_path / f"{name}.h5"
    assert run_cli("extract", images, "--out", cache, *LITE).code == 0
    run = tmp_path / f"{name}-run"
    result = run_cli("fit", cache, "--out", run, "--C", "0.1")
    assert result.code == 0, result.err
    assert "parity: torch Linear vs scikit-learn" in result.out and "parity: model.pt on" in result.out
    return run


@pytest.fixture(scope="session")
def binary_run(tmp_path_factory) -> Path:
    return fitted_run(tmp_path_factory.mktemp("bin"), {"ants": 4, "bees": 4}, "bin")


@pytest.fixture(scope="session")
def three_run(tmp_path_factory) -> Path:
    return fitted_run(tmp_path_factory.mktemp("three"), {"a": 3, "b": 3, "c": 3}, "three")


# --- a small partial cache, for the tests of the cache modules ---------------------------------------

CACHE_META = {"backbone": "toy", "weights": "random", "weights_sha256": "", "pretrained": False, "seed": 0,
              "layer": "toy", "dim": 4, "preprocessing": {"resize": 8, "crop": 8}, "precision": "fp32",
              "listing_sha256": "abc", "classes": ["a", "b"], "command": "transfer extract imgs --out x.h5"}
CACHE_PATHS = ["train/a/0.png", "train/a/1.png", "train/b/2.png", "val/a/3.png", "val/b/4.png"]
CACHE_LABELS = np.array([0, 0, 1, 0, 1])
CACHE_SPLITS = ["train", "train", "train", "val", "val"]


def make_partial(tmp_path: Path, n: int = 5):
    from pipeline.cache import PartialCache

    return PartialCache.create(str(tmp_path / "x.h5.partial"), CACHE_META, np.arange(n), CACHE_PATHS[:n],
                               CACHE_LABELS[:n], CACHE_SPLITS[:n], dim=4)


def rows_features(rows) -> np.ndarray:
    """(len(rows), 4) float32: row r holds r + 0.5 everywhere."""
    return np.stack([np.full(4, r + 0.5, dtype=np.float32) for r in rows])

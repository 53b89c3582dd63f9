"""Shared fixtures: tiny generated image folders, the real photos in ../shared, and a CLI runner."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

# Under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores: torch
# would otherwise start a thread per core in every worker, and OpenMP threads that outnumber the
# cores spin against each other. Set before numpy and torch load; subprocesses inherit it.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"

needs_hymenoptera = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"real photos not found at {HYMENOPTERA}")


# A test that uses one of these is slow: a real network over real photos, or a fitted and exported run.
HEAVY_FIXTURES = {"hymenoptera_lite0", "planted", "binary_run", "three_run", "shipped"}


def built_once(tmp_path_factory, name: str, build):
    """`build(folder)` once per test run, however many pytest-xdist workers run it (`make test` runs
    two): the first worker to ask builds under a file lock, the others wait for it and get its value
    (paths into the shared folder). Without xdist, an ordinary session fixture's folder."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / f"shared-{name}"  # the run's folder, above each worker's
    value_file = folder.parent / f"shared-{name}.pickle"  # written by this run's own workers only
    with FileLock(str(folder) + ".lock"):
        if value_file.exists():
            return pickle.loads(value_file.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # a worker whose build failed left it half made
        folder.mkdir()
        value = build(folder)
        value_file.write_bytes(pickle.dumps(value))
        return value


def pytest_collection_modifyitems(items):
    """Mark the tests that need a heavy session fixture `slow` (`make test-fast` leaves them out)."""
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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

    def build(folder: Path) -> Path:
        out = folder / "hymenoptera_lite0.h5"
        result = run_cli("extract", HYMENOPTERA, "--out", out, "--backbone", "efficientnet_lite0", subprocess_=True)
        assert result.code == 0, result.err
        return out

    return built_once(tmp_path_factory, "hym", build)


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


def fitted_run(tmp_path: Path, classes: dict, name: str, precision: str) -> Path:
    """Images -> extract (random Lite0) -> fit with export; returns the run folder."""
    images = make_folder(tmp_path / f"{name}-images", classes, splits=("train", "val", "test"))
    cache = tmp_path / f"{name}.h5"
    assert run_cli("extract", images, "--out", cache, *LITE, "--precision", precision).code == 0
    run = tmp_path / f"{name}-run"
    result = run_cli("fit", cache, "--out", run, "--C", "0.1")
    assert result.code == 0, result.err
    assert "parity: torch Linear vs scikit-learn" in result.out and "parity: model.pt on" in result.out
    return run


class Stop(Exception):
    """Raised by StopAfterFirstBatch: an extraction interrupted after its first committed batch."""


class StopAfterFirstBatch:
    """A progress sink that stops the extraction once the first batch is committed."""

    def start(self, total, already):
        pass

    def advance(self, n):
        raise Stop()


@pytest.fixture(scope="session")
def binary_run(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "bin",
                      lambda folder: fitted_run(folder, {"ants": 4, "bees": 4}, "bin", "fp32"))


@pytest.fixture(scope="session")
def three_run(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "three",
                      lambda folder: fitted_run(folder, {"a": 3, "b": 3, "c": 3}, "three", "bf16"))


@pytest.fixture(scope="session")
def shipped(three_run, tmp_path_factory) -> Path:
    """three_run's head exported as model.onnx and model.pt2 (model.pt copied beside them)."""

    def build(out: Path) -> Path:
        result = run_cli("export", three_run, "--format", "onnx", "--format", "pt2", "--out", out)
        assert result.code == 0, result.err
        for name in ("model.onnx", "model.pt2"):
            assert f"parity: {name} on " in result.out and f"parity: {name}'s head vs scikit-learn" in result.out
        shutil.copy(three_run / "model.pt", out / "model.pt")
        return out

    return built_once(tmp_path_factory, "shipped", build)


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


@pytest.fixture(scope="session")
def planted(hymenoptera_lite0, tmp_path_factory):
    """The real photos with planted trouble: train/ as it is but 4 ants photos moved into train/bees;
    test/ = the real val photos plus 3 byte copies and 3 re-encoded/resized copies of train photos.
    Only the 6 new files go through the network (the pretrained EfficientNet-Lite0); the others keep
    their features from `hymenoptera_lite0`, as an incremental update would. Returns (cache, facts)."""
    return built_once(tmp_path_factory, "planted", lambda folder: _plant(hymenoptera_lite0, folder / "photos"))


def _plant(hymenoptera_lite0: Path, root: Path):
    from pipeline import read_cache, write_cache

    ants = sorted((HYMENOPTERA / "train" / "ants").iterdir())
    bees = sorted((HYMENOPTERA / "train" / "bees").iterdir())
    moved, exact, changed = ants[:4], [ants[10], ants[20], bees[10]], [ants[30], bees[20], bees[30]]
    new = root.parent / "new"
    for i, f in enumerate(exact):
        (new / "test" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (new / "test" / f.parent.name / f"copy{i}_{f.name}").write_bytes(f.read_bytes())
    for i, f in enumerate(changed):
        image = Image.open(f).convert("RGB")
        if i % 2:
            image = image.resize((image.width * 9 // 10, image.height * 9 // 10))
        (new / "test" / f.parent.name).mkdir(parents=True, exist_ok=True)
        image.save(new / "test" / f.parent.name / f"changed{i}_{f.stem}.jpg", quality=80)
    result = run_cli("extract", new, "--out", root.parent / "new.h5", "--backbone", "efficientnet_lite0")
    assert result.code == 0, result.err
    real, extra = read_cache(hymenoptera_lite0), read_cache(root.parent / "new.h5")
    names, labels, splits = [], [], []
    for source, split_of in ((real, {"train": "train", "val": "test"}), (extra, {"test": "test"})):
        for i, raw in enumerate(source.path_bytes):
            path = os.fsdecode(raw)
            split, cls, name = path.split("/")
            cls = "bees" if split == "train" and HYMENOPTERA / "train" / cls / name in moved else cls
            names.append(f"{split_of[split]}/{cls}/{name}")
            labels.append(source.classes.index(cls))
            splits.append(split_of[split])
            target = root / names[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path(os.fsdecode(os.path.join(os.fsencode(source.image_dir), raw))).resolve())
    out = root.parent / "planted.h5"
    write_cache(out, np.concatenate([real.features(), extra.features()]), np.array(labels), classes=real.classes,
                split=splits, paths=names, provenance={**{k: real.provenance[k] for k in (
                    "backbone", "weights", "weights_source", "weights_sha256", "pretrained", "seed", "layer",
                    "preprocessing", "precision")}, "image_dir": str(root)})
    facts = {"exact": [f"copy{i}_{f.name}" for i, f in enumerate(exact)],
             "changed": [f"changed{i}_{f.stem}.jpg" for i, f in enumerate(changed)],
             "originals": [f.name for f in exact + changed], "moved": [f"train/bees/{f.name}" for f in moved]}
    return out, facts


@pytest.fixture(scope="session")
def tiny_lite0(tmp_path_factory) -> tuple[Path, Path]:
    """(folder, cache): 12 small images in train/val x cat/dog plus one broken file, extracted once
    per session by a random-weights EfficientNet-Lite0 at fp32 (a few seconds): the reference that the
    Embedder, WebDataset shards and merged parts are held against."""

    def build(folder: Path) -> tuple[Path, Path]:
        root = make_folder(folder / "images", {"cat": 3, "dog": 3}, splits=("train", "val"))
        (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
        out = root.parent / "tiny.h5"
        result = run_cli("extract", root, "--out", out, *LITE, "--batch-size", "4", "--precision", "fp32")
        assert result.code == 0, result.err
        return root, out

    return built_once(tmp_path_factory, "tiny", build)


@pytest.fixture(autouse=True, scope="session")
def own_user_cache(tmp_path_factory):
    """The CPU batch probe remembers its results in the user's cache folder: the tests get a fresh one."""
    os.environ["TRANSFER_CACHE_DIR"] = str(tmp_path_factory.mktemp("user-cache"))

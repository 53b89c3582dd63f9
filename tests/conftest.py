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
    saved_env = dict(os.environ)
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
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
